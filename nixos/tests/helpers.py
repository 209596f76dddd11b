# Helpers of the test scripts (./scenarios.nix, ./oci.nix), prepended to them: the test
# driver runs a script with one global per machine, and these use `headscale`.
import base64
import json


def python_on(machine, code, *args):
    """Run Python source on a machine (base64 keeps the quoting simple)."""
    encoded = base64.b64encode(code.encode()).decode()
    return machine.succeed(f"python3 -c 'import base64; exec(base64.b64decode(\"{encoded}\"))' {' '.join(args)}")


def url(ip, path="/", port=None):
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}" + (f":{port}" if port else "") + path


def preauth_key(user, *extra):
    headscale.succeed(f"headscale users create {user}")
    users = json.loads(headscale.succeed("headscale users list -o json"))
    user_id = next(u["id"] for u in users if u["name"] == user)
    return headscale.succeed(f"headscale preauthkeys create --reusable -e 1h -u {user_id} {' '.join(extra)}").strip()


def nodes():
    return json.loads(headscale.succeed("headscale nodes list -o json"))


def node_ips(name):
    found = [n for n in nodes() if n["given_name"] == name]
    assert len(found) == 1, f"expected one node {name}, got {[n['given_name'] for n in nodes()]}"
    return sorted(found[0]["ip_addresses"], key=lambda ip: ":" in ip)  # IPv4 first


def node_ip(name):
    return node_ips(name)[0]


# Prints the answer to a UDP ping, or "no answer".
UDP_PROBE = (
    "import socket, sys\n"
    "family = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
    "s = socket.socket(family, socket.SOCK_DGRAM)\n"
    "s.settimeout(5)\n"
    "s.sendto(b'ping', (sys.argv[1], int(sys.argv[2])))\n"
    "try:\n"
    "    print(s.recv(100).decode())\n"
    "except OSError:\n"
    "    print('no answer')\n"
)
