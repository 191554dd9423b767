"""The Ray Serve endpoint on a real local Ray cluster, called over real HTTP."""

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from vitad_ray.data.frames import items_from_manifest
from vitad_ray.storage.modeldir import read_model_json

from ...ports import free_port

pytestmark = pytest.mark.integration
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_IMAGES, MAX_IMAGE_BYTES = 4, 200_000


@pytest.fixture(scope="module")
def offline_scores(scored):
    """`vitad score` of the test split (the session's, made before Serve holds the CPUs)."""
    return scored["df"], scored["arrays"]


@pytest.fixture(scope="module")
def served(model, ray_local, offline_scores):
    from ray import serve

    from vitad_ray.serve.app import ServeConfig, start

    # 40 ms batch wait: concurrent requests in the tests must meet in one batch.
    cfg = ServeConfig(model_dir=str(model["dir"]), shards=2, port=free_port(), token=TOKEN,
                      embed_batch=8, shard_batch=16, batch_wait_ms=40, embed_threads=1,
                      max_images=MAX_IMAGES, max_image_bytes=MAX_IMAGE_BYTES,
                      request_timeout_s=30, body_timeout_s=2)
    url = start(cfg)
    with httpx.Client(base_url=url, timeout=60) as client:
        yield {"url": url, "client": client, "cfg": cfg}
    serve.shutdown()


@pytest.fixture(scope="module")
def test_frames(scene):
    """(frame_id, png bytes) of the readable test frames."""
    items = [it for it in items_from_manifest(scene["manifest"]) if it["frame_index"] != 999]
    return [(f"{it['clip']}/{it['frame_index']}", open(it["path"], "rb").read()) for it in items]


def _detect(client, images, headers=AUTH, **fields):
    files = [("images", (name, data, "image/png")) for name, data in images]
    return client.post("/v1/detect", files=files, data=fields, headers=headers)


def test_health_model_and_schema(served, model):
    client = served["client"]
    health = client.get("/v1/health")  # no token needed
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert client.get("/v1/model").status_code == 401
    assert client.get("/openapi.json").status_code == 401
    info = client.get("/v1/model", headers=AUTH).json()
    doc = read_model_json(model["dir"])
    assert info["backbone"] == "tiny-dinov2" and info["scopes"] == 257
    assert info["weights_sha256"] == doc["embeddings"]["weights_sha256"]
    assert info["thresholds"]["kmeans"] == doc["thresholds"]["kmeans"]
    assert [s["n_scopes"] for s in info["shards"]] == [129, 128]
    assert info["model_id"] == health.json()["model_id"]
    schema = client.get("/openapi.json", headers=AUTH).json()
    body = schema["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert {"/v1/health", "/v1/model"} <= set(schema["paths"])
    for kind in ("multipart/form-data", "application/json"):
        images = body[kind]["schema"]["properties"]["images"]
        assert (images["minItems"], images["maxItems"]) == (1, MAX_IMAGES)
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/detect"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/v1/health"]["get"]


def test_answers_equal_vitad_score(served, offline_scores, test_frames):
    df, arrays = offline_scores
    row = {fid: i for i, fid in enumerate(df["frame_id"])}
    client, frames = served["client"], test_frames[::3]
    for method in ("kmeans", "hdbscan"):
        answers = []
        for lo in range(0, len(frames), MAX_IMAGES):
            r = _detect(client, frames[lo:lo + MAX_IMAGES], method=method)
            assert r.status_code == 200, r.text
            answers.extend(r.json()["results"])
        # One request as JSON with base64 too: the same answers.
        r = client.post("/v1/detect", headers=AUTH, json={
            "images": [base64.b64encode(frames[0][1]).decode()], "method": method})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["local"]["grid"] == answers[0]["local"]["grid"]
        for (fid, _), a in zip(frames, answers):
            i = row[fid]
            np.testing.assert_allclose(a["global"]["confidence"], df[f"global_{method}"][i],
                                       atol=1e-5)
            grid = np.asarray(a["local"]["grid"])
            assert grid.shape == (16, 16)
            np.testing.assert_allclose(grid.ravel(), arrays[f"local_{method}"][i], atol=1e-5)
            assert a["local"]["n_anomalous"] == df[f"local_{method}_n_anomalous"][i]
            assert a["local"]["anomalous"] == bool(df[f"local_{method}_anomalous"][i])
            assert a["global"]["anomalous"] == bool(df[f"global_{method}_anomalous"][i])


def test_ingress_replica_answers_directly_on_127_0_0_1(served, test_frames):
    """Serve's direct ingress: the ingress replica's own port gives the proxy's answers, with
    the same token rules, and is not reachable on the node's other address."""
    import ray
    from ray.serve.context import _get_global_client

    from vitad_ray.serve.app import direct_urls

    urls = direct_urls(served["cfg"])
    assert len(urls) == 1 and urls[0].startswith("http://127.0.0.1:")
    assert urls[0] != served["url"]
    frames = test_frames[:2]
    via_proxy = _detect(served["client"], frames).json()["results"]
    with httpx.Client(base_url=urls[0], timeout=60) as direct:
        assert direct.get("/v1/health").json()["status"] == "ready"
        assert _detect(direct, frames, headers={}).status_code == 401
        bad = direct.post("/v1/detect", content=b"not an image", headers={
            **AUTH, "Content-Type": "image/png"})
        assert bad.status_code == 422 and "not an image" in bad.json()["error"]
        answer = _detect(direct, frames)
    assert answer.status_code == 200, answer.text
    for a, b in zip(answer.json()["results"], via_proxy):
        a.pop("timings_ms"), b.pop("timings_ms")
        assert a == b
    # The replica binds the app's host only: the node's own address is refused.
    groups = ray.get(_get_global_client()._controller.get_target_groups.remote("vitad"))
    node_ip = groups[0].targets[0].ip
    port = int(urls[0].rsplit(":", 1)[1].split("/")[0])
    if node_ip not in ("127.0.0.1", "localhost"):
        with pytest.raises(OSError), socket.create_connection((node_ip, port), timeout=5):
            pass


def test_scope_and_threshold_overrides(served, test_frames):
    client, frame = served["client"], [test_frames[5]]
    base = _detect(client, frame).json()["results"][0]
    only_global = _detect(client, frame, scope="global").json()["results"][0]
    assert "local" not in only_global
    assert only_global["global"]["confidence"] == base["global"]["confidence"]
    only_local = _detect(client, frame, scope="local").json()["results"][0]
    assert "global" not in only_local and only_local["local"]["grid"] == base["local"]["grid"]
    everything = _detect(client, frame, threshold="0").json()["results"][0]
    assert everything["global"]["anomalous"] and everything["local"]["n_anomalous"] == 256
    assert everything["local"]["grid"] == base["local"]["grid"]  # only the decision moves
    split = _detect(client, frame, global_threshold="0", patch_threshold="1.01").json()
    split = split["results"][0]
    assert split["global"]["anomalous"] and split["local"]["n_anomalous"] == 0
    assert not split["local"]["anomalous"] and split["local"]["threshold"] == 1.01


def test_concurrent_requests_are_batched(served, test_frames):
    client = served["client"]

    def one(i):
        return _detect(client, [test_frames[i % len(test_frames)]])

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(32)))
    assert all(r.status_code == 200 for r in responses)
    timings = [r.json()["results"][0]["timings_ms"] for r in responses]
    assert max(t["embed_batch"] for t in timings) > 1
    assert max(max(t["score_batches"]) for t in timings) > 1


def _png(size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_input_gets_a_4xx_with_a_reason(served):
    client, png = served["client"], _png()
    big = np.random.default_rng(1).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    assert len(buf.getvalue()) > MAX_IMAGE_BYTES
    cases = {
        "non-image bytes": (lambda: _detect(client, [("notes.txt", b"hello, not an image")]),
                            422, "not an image"),
        "truncated jpeg": (lambda: _detect(client, [("cut.jpg", _jpeg()[:600])]), 422,
                           "cannot be decoded"),
        "empty body": (lambda: client.post("/v1/detect", headers={
            **AUTH, "content-type": "application/json"}, content=b""), 400, "empty body"),
        "wrong content type": (lambda: client.post("/v1/detect", headers={
            **AUTH, "content-type": "text/plain"}, content=b"x"), 415, "text/plain"),
        "too many images": (lambda: _detect(client, [("a.png", png)] * (MAX_IMAGES + 1)), 413,
                            "too many images"),
        "image over the size limit": (lambda: _detect(client, [("big.png", buf.getvalue())]),
                                      413, "over the limit"),
        "base64 field not a list": (lambda: client.post("/v1/detect", headers=AUTH, json={
            "images": base64.b64encode(png).decode()}), 422, "must be a list"),
        "base64 item not a string": (lambda: client.post("/v1/detect", headers=AUTH, json={
            "images": [[1, 2, 3]]}), 422, "must be a base64 string"),
        "invalid base64": (lambda: client.post("/v1/detect", headers=AUTH, json={
            "images": ["@@not base64@@"]}), 422, "not valid base64"),
        "no images key": (lambda: client.post("/v1/detect", headers=AUTH, json={"image": "x"}),
                          422, '"images" list'),
        "empty image": (lambda: _detect(client, [("empty.png", b"")]), 422, "is empty"),
        "unknown method": (lambda: _detect(client, [("a.png", png)], method="svm"), 422,
                           "method must be one of"),
        "bad threshold": (lambda: _detect(client, [("a.png", png)], threshold="high"), 422,
                          "threshold must be a number"),
        "no token": (lambda: _detect(client, [("a.png", png)], headers={}), 401, "token"),
        "wrong token": (lambda: _detect(client, [("a.png", png)],
                                        headers={"Authorization": "Bearer nope"}), 401, "token"),
        "non-ASCII token": (lambda: _detect(client, [("a.png", png)], headers={
            "Authorization": "Bearer t\u00e9st".encode("latin-1")}), 401, "token"),
        "nested JSON": (lambda: client.post("/v1/detect", headers={
            **AUTH, "content-type": "application/json"},
            content=b'{"images": ' + b"[" * 2000 + b"]" * 2000 + b"}"), 400, "nested deeper"),
        "chunked body over the limit": (lambda: client.post("/v1/detect", headers={
            **AUTH, "content-type": "application/json"},
            content=(b"x" * 65536 for _ in range(64))), 413, "request body over the limit"),
        "16-bit float image": (lambda: _detect(client, [("f.tif", _float_tiff())]), 422,
                               "float images are not supported"),
    }
    for name, (send, status, reason) in cases.items():
        r = send()
        assert r.headers["content-type"].startswith("application/json"), name
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        assert reason in r.json()["error"], f"{name}: {r.json()}"
    # The server keeps serving, and a good image in a request with the PNG works.
    ok = _detect(client, [("ok.png", png), ("ok2.png", png)])
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def _raw(url: str, head: bytes, body: bytes = b"", wait_s: float = 10.0
         ) -> tuple[bytes, float]:
    """Sends a hand-made request to ``url``'s host and port; returns what came back (empty when
    the server closed or reset the connection) and the seconds it took."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        try:
            s.sendall(head + body)
        except OSError:  # the server refused the rest of what it was sent, and closed
            pass
        answer = b""
        try:
            answer = s.recv(65536)
            took = time.monotonic() - started
            s.settimeout(1.0)  # the rest of an answer already on its way
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
    return answer, (took if answer else time.monotonic() - started)


def test_oversized_headers_and_stalled_bodies_are_cut_off(served, test_frames):
    """Through the proxy and straight to the ingress replica: headers far over the bound are
    refused before they are read whole and without a token; a body that stops short of its
    Content-Length is answered 408 after body_timeout_s (2 s here), not held open."""
    from vitad_ray.serve.app import direct_urls

    for url in [served["url"], *direct_urls(served["cfg"])]:
        pad = b"a" * (8 << 20)
        answer, took = _raw(url, b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nX-Pad: " + pad +
                            b"\r\n\r\n")
        status = answer.split(b"\r\n", 1)[0]
        print(f"\n{url}: 8 MiB header -> {status!r} in {took:.2f} s")
        assert status in (b"", b"HTTP/1.1 400 Bad Request"), answer[:300]
        assert took < 2.0

        head = (b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                TOKEN.encode() + b"\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n")
        answer, took = _raw(url, head, test_frames[0][1][:100], wait_s=30)
        status = answer.split(b"\r\n", 1)[0]
        print(f"{url}: 100 of 5000 body bytes -> {status!r} in {took:.2f} s")
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"request body incomplete" in answer
        assert 2.0 <= took < 6.0
    ok = _detect(served["client"], test_frames[:1])
    assert ok.status_code == 200, ok.text


def test_a_heavy_upload_does_not_hold_up_health_or_other_requests(served, test_frames):
    """Four 6000x6000 images (144 Mpx, inside the request's pixel budget) are decoded off the
    ingress's event loop: health and a lone frame answer meanwhile."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000), (90, 90, 90)).save(buf, "PNG")
    huge = ("huge.png", buf.getvalue())
    assert len(huge[1]) < MAX_IMAGE_BYTES
    client = served["client"]
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        heavy = pool.submit(_detect, client, [huge] * MAX_IMAGES)
        health_s, lone_s = [], []
        while not heavy.done():
            t = time.monotonic()
            assert client.get("/v1/health").status_code == 200
            health_s.append(time.monotonic() - t)
            t = time.monotonic()
            assert _detect(client, test_frames[:1]).status_code == 200
            lone_s.append(time.monotonic() - t)
        answer, heavy_s = heavy.result(), time.monotonic() - started
    assert answer.status_code == 200, answer.text
    print(f"\n4 x 6000x6000 answered in {heavy_s:.2f} s; meanwhile {len(health_s)} health "
          f"calls (slowest {max(health_s):.3f} s), lone frames slowest {max(lone_s):.3f} s")
    assert len(health_s) >= 2 and max(health_s) < 0.5
    assert max(lone_s) < max(2.0, heavy_s / 2)


def test_killed_shard_replica_fails_requests_visibly_then_recovers(served, test_frames):
    import ray
    from ray import serve

    client = served["client"]
    stop_at = [time.monotonic() + 120]
    log: list[tuple[float, int, str]] = []
    waited: list[tuple[float, int]] = []  # (seconds from send to answer, status)
    lock = threading.Lock()

    def load(worker: int):
        i = worker
        while time.monotonic() < stop_at[0]:
            sent = time.monotonic()
            try:
                r = _detect(client, [test_frames[i % len(test_frames)]])
                status, text = r.status_code, r.text
            except httpx.TimeoutException as exc:  # a hung request: the test fails on it
                status, text = -1, repr(exc)
            with lock:
                log.append((time.monotonic(), status, text))
                waited.append((time.monotonic() - sent, status))
            i += 4

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    named = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "ScopeShard1" in a["name"]]
    assert len(named) == 1, named
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(named[0]["name"], namespace="serve"), no_restart=True)
    # Serve notices the dead replica and starts another; then requests succeed again.
    recovered_at, health = None, []
    while time.monotonic() < killed_at + 90:
        h = httpx.get(f"{served['url']}/v1/health", timeout=10)
        health.append((h.status_code, h.json()["status"], h.json().get("waiting_for", [])))
        with lock:
            after = [s for t, s, _ in log if t > killed_at + 0.5]
        alive = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and "ScopeShard1" in a["name"]]
        if alive and alive[0]["name"] != named[0]["name"] and after.count(200) >= 5:
            recovered_at = time.monotonic()
            break
        time.sleep(0.5)
    stop_at[0] = time.monotonic()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a client request hung"
    statuses = [s for _, s, _ in log]
    failed = [(s, text) for _, s, text in log if s != 200]
    print(f"\n{len(log)} requests, {len(failed)} failed around the kill: "
          f"{sorted(set(s for s, _ in failed))}")
    assert recovered_at is not None, f"no recovery; statuses after the kill: {statuses[-20:]}"
    assert -1 not in statuses
    # Every failure is reported as a retryable 5xx JSON error, never a hang or a wrong answer.
    for status, text in failed:
        assert status == 503, text  # fast, not the request timeout's 504
        assert "backend" in text and '"retry":true' in text.replace(" ", "")
    slowest_failure = max([w for w, s in waited if s != 200], default=0.0)
    print(f"slowest failed request: {slowest_failure:.1f} s")
    assert slowest_failure < 10.0  # the request timeout is 30 s here
    assert serve.status().applications["vitad"].status == "RUNNING"
    # Health told the outage while it lasted, and names the backend it waits for.
    assert (503, "starting", ["ScopeShard1"]) in health, health
    final = client.get("/v1/health")
    assert final.status_code == 200 and final.json()["status"] == "ready"


def test_replicas_run_at_the_configured_niceness(served):
    """Ray starts workers at niceness 15; the app's replicas run at 0, Serve's proxy as Ray
    starts it."""
    import psutil

    assert served["cfg"].compute_niceness == 0
    nice, proxy = {}, []
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        prefix = "ray::ServeReplica:vitad:"  # Ray's process title, then the current method
        if title.startswith(prefix):
            nice[title[len(prefix):].split(".")[0].split()[0]] = proc.nice()
        elif title.startswith("ray::ProxyActor"):
            proxy.append(proc.nice())
    assert nice == {"Ingress": 0, "Embedder": 0, "ScopeShard0": 0, "ScopeShard1": 0}
    assert proxy and all(n > 0 for n in proxy)  # Ray's own (15): the option is what lowers ours


def _float_tiff() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)).save(buf, "TIFF")
    return buf.getvalue()
