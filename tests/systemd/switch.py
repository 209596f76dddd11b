"""`switch-to-configuration test` for the guest's units, as NixOS applies a changed
configuration to services (nixos/modules/system/activation/switch-to-configuration):
a changed unit that is running is reloaded if X-ReloadIfChanged=true, left alone if
X-RestartIfChanged=false, restarted in one step if X-StopIfChanged=false, and otherwise
stopped before the new units are loaded and started after. Runs inside the guest:

    python3 switch.py NEW_UNITS_DIR
"""

import subprocess
import sys
from pathlib import Path

INSTALLED = Path("/etc/systemd/system")


def setting(text: str, name: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(name + "="):
            return line.split("=", 1)[1]
    return None


def active(unit: str) -> bool:
    return subprocess.run(["systemctl", "is-active", "--quiet", unit]).returncode == 0


def main(new_dir: Path) -> None:
    stop_first, restart, reload = [], [], []
    for new in sorted(new_dir.glob("*.service")):
        old = INSTALLED / new.name
        text = new.read_text()
        if old.exists() and old.read_text() == text:
            continue
        if old.exists() and active(new.name):
            if setting(text, "X-ReloadIfChanged") == "true":
                reload.append(new.name)
            elif setting(text, "X-RestartIfChanged") == "false":
                pass
            elif setting(text, "X-StopIfChanged") == "false":
                restart.append(new.name)
            else:
                stop_first.append(new.name)
        print(f"changed: {new.name}")
    if stop_first:
        subprocess.run(["systemctl", "stop", *stop_first], check=True)
    for new in new_dir.glob("*.service"):
        (INSTALLED / new.name).write_text(new.read_text())
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    if reload:
        subprocess.run(["systemctl", "reload", *reload], check=True)
    if restart or stop_first:
        subprocess.run(["systemctl", "restart", *restart, *stop_first], check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
