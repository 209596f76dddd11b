"""A STAND-IN for Tailscale's Funnel relays, which cannot exist offline.

What a relay does for a node, as far as the node can tell (tailscale's
ipn/ipnlocal/serve.go, handleServeIngress): a tailnet peer that holds the
https://tailscale.com/cap/ingress capability opens a connection to the node's peer API,
sends `POST /v0/ingress` with `Tailscale-Ingress-Src` (the public client's ip:port) and
`Tailscale-Ingress-Target` (the node's name:port), gets `101 Switching Protocols` and then
carries the public client's bytes (its TLS, end to end) both ways.

Here that peer is a real tailscaled (tag:relay, granted the capability by the policy in
certtailnet.py) whose outbound HTTP proxy carries the connection over the tailnet. The
relay's public side is a TCP listener on a harness address, one per exposed node; what
connects there is a public client, and its address is what the relay reports.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import attrs

from .headscale import Headscale
from .processes import free_port, wait_for
from .tailnet import TailscaleNode


@attrs.define
class Refusal:
    target: str
    status_line: str


class StandInFunnelRelay:
    def __init__(self, bin_dir: Path, workdir: Path, public_ip: str):
        self.public_ip = public_ip
        self.proxy_port = free_port()
        self.node = TailscaleNode("funnel-relay", bin_dir, workdir,
                                  extra_args=[f"--outbound-http-proxy-listen=127.0.0.1:{self.proxy_port}"])
        self.refusals: list[Refusal] = []  # ingress requests the node did not take
        self.forwarded: list[tuple[str, str]] = []  # (source ip:port, target) handed over
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="funnel-relay", daemon=True)

    def start(self, headscale: Headscale) -> StandInFunnelRelay:
        self.node.start()
        self.node.up(headscale.url, headscale.auth_key(tags=["tag:relay"]))
        self._thread.start()
        return self

    def peer_api(self, node_ip: str) -> str:
        """host:port of a node's peer API, from the relay's network map (as a real relay learns it)."""
        def lookup() -> str | None:
            for peer in (self.node.status().get("Peer") or {}).values():
                if node_ip in (peer.get("TailscaleIPs") or ()):
                    urls = [url for url in peer.get("PeerAPIURL") or () if f"//{node_ip}:" in url]
                    return urls[0].removeprefix("http://") if urls else None
            return None
        return wait_for(lookup, 30, f"the relay to learn {node_ip}'s peer API")

    def expose(self, dns_name: str, node_ip: str, port: int = 443) -> int:
        """Start relaying a public port (returned) of public_ip to the node's `dns_name:port`."""
        self.node.wait_for_peer(node_ip)
        peer_api, target = self.peer_api(node_ip), f"{dns_name}:{port}"
        public_port = free_port(self.public_ip)

        async def listen() -> None:
            await asyncio.start_server(lambda r, w: self._relay(r, w, peer_api, target), self.public_ip, public_port)
        asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        return public_port

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                     peer_api: str, target: str) -> None:
        source_ip, source_port = client_writer.get_extra_info("peername")[:2]
        node_reader, node_writer = await asyncio.open_connection("127.0.0.1", self.proxy_port)
        try:
            node_writer.write(f"CONNECT {peer_api} HTTP/1.1\r\nHost: {peer_api}\r\n\r\n".encode())
            proxy_answer = await _head(node_reader)
            if not proxy_answer.startswith("HTTP/1.1 200"):
                self.refusals.append(Refusal(target, f"relay's proxy: {proxy_answer}"))
                return
            node_writer.write((f"POST /v0/ingress HTTP/1.1\r\nHost: {peer_api}\r\n"
                               f"Tailscale-Ingress-Src: {source_ip}:{source_port}\r\n"
                               f"Tailscale-Ingress-Target: {target}\r\n\r\n").encode())
            answer = await _head(node_reader)
            if not answer.startswith("HTTP/1.1 101"):
                self.refusals.append(Refusal(target, answer))
                return
            self.forwarded.append((f"{source_ip}:{source_port}", target))
            await asyncio.gather(_pipe(client_reader, node_writer), _pipe(node_reader, client_writer))
        finally:
            client_writer.close()
            node_writer.close()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self.node.stop()


async def _head(reader: asyncio.StreamReader) -> str:
    """The status line of an HTTP/1.1 response head (the rest of the head is read and dropped)."""
    head = await reader.readuntil(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(errors="replace")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
