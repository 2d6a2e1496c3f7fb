"""A ComfyUI API client for the tests, written here from the protocol of ComfyUI's own example scripts
(script_examples/basic_api_example.py and websockets_api_example.py): POST /prompt with the API prompt,
`client_id` and `prompt_id`; listen on /ws?clientId= until `executing` with node None for that prompt;
GET /history/{prompt_id}; GET /view?filename&subfolder&type for each image of each output node.

Standard library only (urllib + a minimal RFC 6455 WebSocket client), so the test depends on nothing the
server uses: it checks the wire protocol, not aiohttp against itself.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
import urllib.parse
import urllib.request
import uuid


class WebSocket:
    """Just enough of RFC 6455 for a client: handshake, masked sends, text/binary/ping/close receives."""

    def __init__(self, url: str, timeout: float = 60.0, headers: dict | None = None):
        u = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path + ("?" + u.query if u.query else "")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"{extra}\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("connection closed during the WebSocket handshake")
            head += chunk
        self.status = int(head.split(b" ", 2)[1])
        if self.status != 101:
            raise ConnectionError(f"WebSocket handshake refused: {head.decode(errors='replace').splitlines()[0]}")
        self._buf = b""

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("WebSocket closed by the server")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, text: str) -> None:
        self._send(0x1, text.encode())

    def recv(self):
        """The next message: str for text, bytes for binary (fragments joined, pings answered)."""
        parts, kind = [], None
        while True:
            b0, b1 = self._read(2)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                raise ConnectionError("WebSocket closed by the server")
            if opcode in (0x1, 0x2):
                kind = opcode
            parts.append(payload)
            if fin:
                data = b"".join(parts)
                return data.decode() if kind == 0x1 else data

    def close(self) -> None:
        try:
            self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()


class ComfyClient:
    """websockets_api_example.py's functions, as methods."""

    def __init__(self, server_address: str, client_id: str | None = None, timeout: float = 120.0):
        self.server_address = server_address
        self.client_id = client_id or str(uuid.uuid4())
        self.timeout = timeout
        self.binary_frames: list = []
        self.messages: list = []

    def connect(self) -> WebSocket:
        return WebSocket(f"ws://{self.server_address}/ws?clientId={self.client_id}", timeout=self.timeout)

    def queue_prompt(self, prompt, prompt_id):
        p = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        data = json.dumps(p).encode("utf-8")
        req = urllib.request.Request(f"http://{self.server_address}/prompt", data=data)
        return json.loads(urllib.request.urlopen(req, timeout=self.timeout).read())

    def get_image(self, filename, subfolder, folder_type) -> bytes:
        data = {"filename": filename, "subfolder": subfolder, "type": folder_type}
        url_values = urllib.parse.urlencode(data)
        with urllib.request.urlopen(f"http://{self.server_address}/view?{url_values}", timeout=self.timeout) as r:
            return r.read()

    def get_history(self, prompt_id) -> dict:
        with urllib.request.urlopen(f"http://{self.server_address}/history/{prompt_id}", timeout=self.timeout) as r:
            return json.loads(r.read())

    def get_images(self, ws: WebSocket, prompt) -> tuple[str, dict]:
        prompt_id = str(uuid.uuid4())
        self.queue_prompt(prompt, prompt_id)
        output_images = {}
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                self.messages.append(message)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["node"] is None and data["prompt_id"] == prompt_id:
                        break  # execution is done
            else:
                self.binary_frames.append(out)  # previews: 4-byte event type, 4-byte image type, image bytes
        history = self.get_history(prompt_id)[prompt_id]
        for node_id in history["outputs"]:
            node_output = history["outputs"][node_id]
            images_output = []
            if "images" in node_output:
                for image in node_output["images"]:
                    images_output.append(self.get_image(image["filename"], image["subfolder"], image["type"]))
            output_images[node_id] = images_output
        return prompt_id, output_images
