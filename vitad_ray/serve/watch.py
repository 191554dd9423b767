"""`vitad watch`: a camera's client of the endpoint. It reads a video file, a folder of frames
or a live stream (PyAV: RTSP, HTTP), samples it, posts the frames of one stream in order, prints
each alarm as it happens and writes the timeline.

Order matters (a stream's motion and smoothing need its frames in order), so one request is in
flight at a time, carrying the next run of consecutive frames (``batch``); decoding runs ahead in
a thread into a bounded queue (``buffer`` frames), which holds the reader back when the endpoint is
slower than the source. A 503 / 504 or a lost connection is retried with backoff until
``give_up_s`` without an answer, so the client outlives an endpoint restart (the stream then
starts afresh there); a 409 (frames already scored, an answer lost on the way) moves on.
"""

from __future__ import annotations

import csv
import io
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..data.frames import IMAGE_SUFFIXES, PAPER_FPS, image_rgb8, sample_video

TIMELINE_COLUMNS = ("frame_index", "timestamp_s", "frame_score", "threshold", "anomalous",
                    "fired", "status", "latency_ms")
RETRY_STATUSES = (502, 503, 504)
# A wrong token, an unknown model, a stream bound to another model, a paper model (no
# streams): the watch stops rather than send the rest to the same answer.
FATAL_STATUSES = (401, 404, 422)


def source_frames(source: str, fps: float | None) -> Iterator[tuple[int, float, np.ndarray]]:
    """(frame number, timestamp s, RGB frame) of a video file or URL sampled at ``fps`` (None or 0:
    every frame), or of a folder's images in name order (timestamps at ``fps``, default 4.17)."""
    path = Path(source)
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        rate = fps or PAPER_FPS
        for i, file in enumerate(files):
            with Image.open(file) as im:
                yield i, i / rate, image_rgb8(im)
        return
    yield from sample_video(source, fps or None)


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class WatchResult:
    rows: list[dict] = field(default_factory=list)  # one per frame, TIMELINE_COLUMNS
    alarms: list[dict] = field(default_factory=list)  # rows of the anomalous frames + "grid"
    retries: int = 0
    seconds: float = 0.0


class Watcher:
    """Posts a source's frames to ``endpoint``'s /v1/detect as stream ``stream``."""

    def __init__(self, endpoint: str, stream: str, token: str | None = None,
                 model: str | None = None, batch: int = 4, buffer: int = 32,
                 give_up_s: float = 300.0, timeout_s: float = 60.0,
                 say: Callable[[str], None] = print, keep_alarm_frames: int = 24):
        import httpx

        self.url = endpoint.rstrip("/") + "/v1/detect"
        self.stream, self.model = stream, model
        self.batch, self.buffer, self.give_up_s = max(1, batch), max(1, buffer), give_up_s
        self.say, self.keep_alarm_frames = say, keep_alarm_frames
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(headers=headers, timeout=timeout_s)
        self.alarm_frames: dict[int, np.ndarray] = {}  # the highest-scoring alarms' pixels

    def model_fps(self) -> float | None:
        """The served model's training frame rate (None: not known, or no answer)."""
        import httpx

        try:
            resp = self.client.get(self.url.rsplit("/", 1)[0] + "/model",
                                   params={"model": self.model} if self.model else None)
            return resp.json().get("fps") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def run(self, frames: Iterator[tuple[int, float, np.ndarray]]) -> WatchResult:
        result = WatchResult()
        start = time.perf_counter()
        q: queue.Queue = queue.Queue(maxsize=self.buffer)
        failure: list[BaseException] = []

        def read():
            try:
                for item in frames:
                    q.put(item)
            except BaseException as exc:  # noqa: BLE001 - reported by the sender
                failure.append(exc)
            finally:
                q.put(None)

        threading.Thread(target=read, daemon=True, name="vitad-watch-reader").start()
        pending: list = []
        done = False
        while not done or pending:
            if not done:
                item = q.get()
                if item is None:
                    done = True
                else:
                    pending.append(item)
            # A request carries consecutive frames only (the endpoint numbers them on from the
            # first): a gap in the numbers ends the run.
            gap = len(pending) > 1 and pending[-1][0] != pending[-2][0] + 1
            if pending and (done or len(pending) >= self.batch or gap or q.empty()):
                send, pending = (pending[:-1], pending[-1:]) if gap else (pending, [])
                self._post(send, result)
        if failure:
            self.say(f"[watch] the source stopped: {failure[0]}")
        result.seconds = time.perf_counter() - start
        return result

    def _post(self, frames: list, result: WatchResult) -> None:
        """One request for a run of consecutive frames, retried while the endpoint is away."""
        import httpx

        files = [("images", (f"{n}.png", encode_png(rgb), "image/png")) for n, _, rgb in frames]
        data = {"stream": self.stream, "frame_index": str(frames[0][0])}
        if self.model:
            data["model"] = self.model
        waited, delay = 0.0, 0.5
        while True:
            t0 = time.perf_counter()
            try:
                resp = self.client.post(self.url, files=files, data=data)
                status, reason = resp.status_code, ""
            except httpx.HTTPError as exc:
                status, reason = 0, f"{exc.__class__.__name__}: {exc}"
            latency = 1000 * (time.perf_counter() - t0)
            if status == 200:
                break
            if status in RETRY_STATUSES or status == 0:
                if waited >= self.give_up_s:
                    self._record(frames, result, f"gave up after {waited:.0f} s", latency)
                    return
                if not reason:
                    reason = _reason(resp)
                self.say(f"[watch] endpoint unavailable ({status or reason}); retrying in "
                         f"{delay:.1f} s")
                result.retries += 1
                time.sleep(delay)
                waited += delay + latency / 1000
                delay = min(10.0, 2 * delay)
                continue
            reason = _reason(resp)
            if status in FATAL_STATUSES:  # every later request would be refused alike
                raise RuntimeError(f"the endpoint refused the stream ({status}): {reason}")
            status_text = "already scored (409)" if status == 409 else f"{status}: {reason}"
            self.say(f"[watch] frames {frames[0][0]}..{frames[-1][0]} not scored: {status_text}")
            self._record(frames, result, status_text, latency)
            return
        for (n, t, rgb), answer in zip(frames, resp.json()["results"]):
            row = {"frame_index": n, "timestamp_s": round(t, 3),
                   "frame_score": answer["frame_score"], "threshold": answer["threshold"],
                   "anomalous": bool(answer["anomalous"]), "fired": ",".join(answer["fired"]),
                   "status": "ok", "latency_ms": round(latency / len(frames), 1)}
            result.rows.append(row)
            if row["anomalous"]:
                result.alarms.append(dict(row, grid=answer["grid"]))
                self._keep(n, rgb, result)
                self.say(f"[watch] ALARM {_clock(t)} frame {n}: score {row['frame_score']:.3f} "
                         f">= {row['threshold']:.3f} ({row['fired'] or 'frame'})")

    def _keep(self, n: int, rgb: np.ndarray, result: WatchResult) -> None:
        """Keeps the pixels of the ``keep_alarm_frames`` highest-scoring alarms for the report."""
        self.alarm_frames[n] = rgb
        if len(self.alarm_frames) > self.keep_alarm_frames:
            scores = {a["frame_index"]: a["frame_score"] for a in result.alarms}
            del self.alarm_frames[min(self.alarm_frames, key=lambda k: scores[k])]

    @staticmethod
    def _record(frames: list, result: WatchResult, status: str, latency: float) -> None:
        for n, t, _ in frames:
            result.rows.append({"frame_index": n, "timestamp_s": round(t, 3),
                                "frame_score": float("nan"), "threshold": float("nan"),
                                "anomalous": False, "fired": "", "status": status,
                                "latency_ms": round(latency, 1)})


def _reason(resp) -> str:
    try:
        return str(resp.json().get("error", ""))[:300]
    except Exception:  # noqa: BLE001 - not JSON (a proxy's page): its first line
        return resp.text.splitlines()[0][:300] if resp.text else ""


def _clock(t: float) -> str:
    minutes, seconds = divmod(t, 60)
    return f"{int(minutes):02d}:{seconds:05.2f}"


def write_timeline(path: str | Path, rows: list[dict]) -> Path:
    from ..storage.atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TIMELINE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_watch_report(out_dir: str | Path, result: WatchResult, frames: dict[int, np.ndarray],
                       title: str) -> Path:
    """``index.html``: the score over time with the threshold and the alarms, and the heatmap of
    each alarm frame kept (the highest-scoring ones)."""
    import html

    from ..evaluation.report import _plt, heatmap_overlay

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    ok = [r for r in result.rows if r["status"] == "ok"]
    t = np.array([r["timestamp_s"] for r in ok])
    s = np.array([r["frame_score"] for r in ok])
    fig, ax = plt.subplots(figsize=(10, 2.8))
    ax.plot(t, s, lw=1, color="#1f77b4", label="frame score")
    if ok:
        ax.step(t, [r["threshold"] for r in ok], where="post", color="#d62728", lw=1,
                label="threshold")
    alarms = [r for r in ok if r["anomalous"]]
    ax.scatter([r["timestamp_s"] for r in alarms], [r["frame_score"] for r in alarms], s=8,
               color="#d62728", zorder=3, label="alarm")
    ax.set_xlabel("time (s)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=100)
    plt.close(fig)
    cells = []
    grids = {a["frame_index"]: a for a in result.alarms}
    for n in sorted(frames, key=lambda k: -grids[k]["frame_score"]):
        alarm = grids[n]
        name = f"alarm_{n}.png"
        heatmap_overlay(frames[n], np.asarray(alarm["grid"], np.float64),
                        f"{_clock(alarm['timestamp_s'])} frame {n}, score "
                        f"{alarm['frame_score']:.2f} ({alarm['fired'] or 'frame'})",
                        out / name)
        cells.append(f'<img src="{name}" width="320">')
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<h1>{html.escape(title)}</h1><p>{len(result.rows)} frames, {len(alarms)} alarms, "
            f"{sum(r['status'] != 'ok' for r in result.rows)} not scored; {result.retries} "
            "retries.</p><img src='timeline.png' width='100%'>"
            "<h2>Alarm frames (highest scores)</h2>" + "".join(cells))
    (out / "index.html").write_text(page)
    return out / "index.html"
