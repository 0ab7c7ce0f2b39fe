"""Hostile inputs and faults against a real `floe serve` (fake engine): what each costs and how it
ends. Prints one line per case; run it from any checkout of floe to compare two versions:

    python scripts/hostile_check.py                      # this checkout
    python scripts/hostile_check.py --src ../old-floe    # another checkout, same interpreter

Cases (issue 9): a 1M-character prompt; 2.5M one-id lists; a 125 MiB gRPC message; Content-Length
with Transfer-Encoding and a request smuggled behind it; 100 slow-header connections; a client that
disconnects while queued; queue timeouts under load; "too large" decided in a replica; a malformed
protobuf; and the front end's resident memory before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, src: str, *args: str) -> None:
        self.port, self.gport = free_port(), free_port()
        env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "floe", "serve", "--engine", "fake", "--port", str(self.port),
             "--grpc-port", str(self.gport), "--start-port", str(free_port()), *args],
            cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("server did not become ready")

    def rss_mib(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2 ** 20

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            _, err = self.proc.communicate()
        return err.decode(errors="replace")


def probe_health(url: str, stop: threading.Event, worst: list) -> None:
    """Worst /health latency while a hostile request runs (the event loop's responsiveness)."""
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            t = time.perf_counter()
            c.get(url + "/health")
            worst[0] = max(worst[0], time.perf_counter() - t)
            time.sleep(0.02)


def timed_post(srv: Server, body: bytes, path: str = "/v1/embeddings") -> tuple[int, float, float, str]:
    stop, worst = threading.Event(), [0.0]
    t = threading.Thread(target=probe_health, args=(srv.url, stop, worst))
    t.start()
    t0 = time.perf_counter()
    try:
        r = httpx.post(srv.url + path, content=body, headers={"content-type": "application/json"},
                       timeout=300)
        status, text = r.status_code, r.text[:120]
    except httpx.HTTPError as e:
        status, text = 0, type(e).__name__
    took = time.perf_counter() - t0
    stop.set()
    t.join()
    return status, took, worst[0], text


def raw(port: int, data: bytes, wait: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--src", default=os.getcwd(), help="floe checkout to run")
    args = ap.parse_args()
    src = os.path.abspath(args.src)
    out: dict[str, object] = {}

    srv = Server(src, "--num-replicas", "1", "--max-queued-tokens", "2000")
    try:
        for _ in range(5):
            httpx.post(srv.url + "/v1/embeddings", json={"input": ["warm up"] * 32}, timeout=60)
        base = srv.rss_mib()
        out["rss_baseline_mib"] = round(base, 1)

        body = json.dumps({"input": ["a", "b", "c", "d"], "prompt": "p" * 1_000_000}).encode()
        s, took, worst, _ = timed_post(srv, body)
        out["prompt_1M"] = {"status": s, "seconds": round(took, 3), "worst_health_s": round(worst, 3),
                            "rss_growth_mib": round(srv.rss_mib() - base, 1)}

        body = b'{"input": [' + b",".join([b"[1]"] * 2_500_000) + b"]}"
        s, took, worst, _ = timed_post(srv, body)
        out["ids_2_5M_lists"] = {"status": s, "seconds": round(took, 3),
                                 "worst_health_s": round(worst, 3)}

        big = b"\x05\x00\x00\x00" * (125 * 2 ** 18)   # 125 MiB of int32 ids
        from floe.proto import floe_pb2, floe_pb2_grpc
        t0 = time.perf_counter()
        with grpc.insecure_channel(f"127.0.0.1:{srv.gport}", options=[
                ("grpc.max_send_message_length", 256 * 2 ** 20)]) as ch:
            try:
                floe_pb2_grpc.EmbedderStub(ch).Encode(
                    floe_pb2.EncodeRequest(token_ids=big, lengths=[len(big) // 4]), timeout=120)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
        out["grpc_125MiB"] = {"code": code, "seconds": round(time.perf_counter() - t0, 3),
                              "rss_growth_mib": round(srv.rss_mib() - base, 1)}
        del big

        smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        chunked = b"0\r\n\r\n" + smuggled
        req = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunked)) + chunked
        resp = raw(srv.port, req)
        out["cl_te_smuggling"] = {"responses": resp.count(b"HTTP/1.1 "),
                                  "first": resp.split(b"\r\n", 1)[0].decode(errors="replace")}

        socks = []
        for _ in range(100):
            s_ = socket.create_connection(("127.0.0.1", srv.port))
            s_.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
            socks.append(s_)
        time.sleep(15)
        closed = 0
        for s_ in socks:
            s_.setblocking(False)
            try:
                closed += s_.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed += 1
            s_.close()
        out["slow_headers_100"] = {"closed_within_15s": closed}

        for name, payload in (("malformed_protobuf", b"\xff\xff\xff\xff\x0f"),):
            with grpc.insecure_channel(f"127.0.0.1:{srv.gport}") as ch:
                call = ch.unary_unary("/floe.v1.Embedder/Encode", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
                try:
                    call(payload, timeout=10)
                    out[name] = "OK"
                except grpc.RpcError as e:
                    out[name] = {"code": e.code().name, "details": (e.details() or "")[:80]}

        r = httpx.post(srv.url + "/v1/embeddings", json={"input": [[5] * 200] * 16}, timeout=60)
        out["too_large_in_replica"] = {"status": r.status_code,
                                       "retry_after": r.headers.get("retry-after")}
        time.sleep(1)
        out["rss_after_mib"] = round(srv.rss_mib(), 1)
    finally:
        log = srv.stop()
    out["tracebacks_in_log"] = log.count("Traceback")
    if "Traceback" in log:
        print(log[log.index("Traceback") - 300:][:3000], file=sys.stderr)

    srv = Server(src, "--num-replicas", "2", "--max-batch-size", "1", "--batch-timeout-ms", "0",
                 "--fake-seconds-per-batch", "1.0", "--forward-timeout", "2.5") \
        if "--fake-seconds-per-batch" in subprocess.run(
            [sys.executable, "-m", "floe", "serve", "--help"], cwd=src, capture_output=True,
            text=True, env={**os.environ, "PYTHONPATH": src}).stdout else None
    if srv is None:   # an older floe read the fake engine's timing from the environment
        os.environ["FLOE_FAKE_SECONDS_PER_BATCH"] = "1.0"
        srv = Server(src, "--num-replicas", "2", "--max-batch-size", "1", "--batch-timeout-ms", "0",
                     "--forward-timeout", "2.5")
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                t0 = time.perf_counter()
                rs = await asyncio.gather(*(c.post(srv.url + "/v1/embeddings", json={"input": f"t{i}"})
                                            for i in range(8)))
                return rs, time.perf_counter() - t0
        rs, took = asyncio.run(burst())
        codes: dict[int, int] = {}
        for r in rs:
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
        msgs = sorted({r.json()["error"]["message"][:90] for r in rs if r.status_code != 200})
        out["timeouts_under_load"] = {"codes": codes, "seconds": round(took, 2), "messages": msgs}

        before = httpx.get(srv.url + "/metrics", timeout=10).text
        with socket.create_connection(("127.0.0.1", srv.port)) as s_:
            b = json.dumps({"input": ["gone"] * 4}).encode()
            s_.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(b) + b)
            time.sleep(0.2)
        time.sleep(6)
        after = httpx.get(srv.url + "/metrics", timeout=10).text

        def dropped(text: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("floe_dropped_sequences_total"))
        out["disconnect"] = {"dropped_sequences": dropped(after) - dropped(before)}
    finally:
        log = srv.stop()
    out["disconnect"]["tracebacks_in_log"] = log.count("Traceback")  # type: ignore[index]
    if "Traceback" in log:
        print(log[log.index("Traceback") - 300:][:3000], file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
