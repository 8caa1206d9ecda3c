"""The MedSynth backend worker: one long-lived process that keeps the model loaded.

Run by path with a Python that can import MedSynthLib (the Slicer module uses
``PythonSlicer``)::

    python worker.py --exchange FOLDER

It speaks the protocol of :mod:`protocol` (typed JSON lines; arrays as ``.npy``
files in ``FOLDER``).  Requests run one at a time on a worker thread, in order;
the main thread keeps reading stdin, so a ``cancel`` is seen at once and the
running request stops at its next step (the client kills the process when a
step takes longer than it is willing to wait).  A backend error is answered
with one ``error`` event whose text is MedSynthLib's one-line message; the
worker then serves the next request.

``preview`` keeps one :class:`MedSynthLib.synthesis.preview.PreviewSession` (the
case's label map and images in memory): the first request of a session sends the
whole label map, later ones only the region an edit touched, and each answer
carries only the region of the four images that was rendered again.  A request naming a
real case (``context``) is previewed by the inpainting renderer, as Generate inpaints it.  A preview
request supersedes every earlier one still queued or running: their label
regions are applied all the same, their renders stop at the next network layer
(answered ``cancelled``), and the newest render covers all their changes.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run by path: make the package (and MedSynthLib beside it) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedSynthSlicerLib.protocol import (Event, ProtocolError, Request, decode, encode,  # noqa: E402
                                        put_array, take_array)


class Cancelled(Exception):
    """The client cancelled the running request."""


class Worker:
    """The request loop: engines by (model, device, precision), one preview renderer per engine."""

    def __init__(self, exchange: Path, send: Callable[[Event], None]) -> None:
        self.exchange = exchange
        self.send = send
        self.cancelled: set[int] = set()
        self.superseded: set[int] = set()
        self._engines: dict[tuple, Any] = {}
        self._session: Any = None  # the PreviewSession
        self._session_key: tuple | None = None
        self._open_previews: set[int] = set()
        self._lock = threading.Lock()

    # --- helpers ------------------------------------------------------------------------------

    def step(self, request: Request, fraction: float, text: str) -> None:
        """Report progress, and stop here when the request was cancelled."""
        if request.id in self.cancelled:
            raise Cancelled()
        self.send(Event("progress", request.id, fraction=fraction, text=text))

    def engine(self, params: dict[str, Any]) -> tuple[tuple, Any]:
        from MedSynthLib.synthesis.models import resolve_model
        from MedSynthLib.synthesis.synthesize import SynthesisEngine

        key = (params.get("model") or None, params.get("device", "auto"), params.get("precision", "auto"))
        if key not in self._engines:
            self._engines.clear()  # one model in memory at a time
            self._session, self._session_key = None, None
            self._engines[key] = SynthesisEngine(resolve_model(key[0]), key[1], key[2],
                                                 log=lambda m: print(f"medsynth: {m}", file=sys.stderr, flush=True))
        engine = self._engines[key]
        engine.appearance_spread = params.get("appearance_spread", 1.0)  # a plain attribute: no reload
        engine.synth.mirror_average = bool(params.get("mirror_average", True))  # likewise
        return key, engine

    def inpainting_engine(self, params: dict[str, Any]) -> tuple[tuple, Any]:
        """The inpainting engine of ``params`` (``inpainting_model``, ``device``, ``precision``), loaded once."""
        from MedSynthLib.synthesis.inpainting import InpaintingEngine
        from MedSynthLib.synthesis.models import resolve_model

        key = ("inpainting", params.get("inpainting_model") or None, params.get("device", "auto"),
               params.get("precision", "auto"))
        if key not in self._engines:
            self._engines.clear()  # one model in memory at a time
            self._session, self._session_key = None, None
            self._engines[key] = InpaintingEngine(resolve_model(key[1], kind="inpainting"), key[2], key[3],
                                                  log=lambda m: print(f"medsynth: {m}", file=sys.stderr, flush=True))
        engine = self._engines[key]
        engine.mirror_average = bool(params.get("mirror_average", True))  # a plain attribute: no reload
        return key, engine

    @staticmethod
    def labelmap(request: Request) -> Any:
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.grid import Grid, LabelMap
        from MedSynthLib.schema.provenance import PrivacyRecord

        if "labels" not in request.arrays or "grid" not in request.params:
            raise MedSynthError(f"{request.op}: the request carries no label map")
        array = take_array(request.arrays["labels"])
        try:
            return LabelMap(array, Grid.from_json(request.params["grid"]), list(request.params.get("history", [])),
                            privacy=PrivacyRecord.from_json(request.params.get("privacy")))
        except ValueError as exc:
            raise MedSynthError(f"the label map sent is not valid: {exc}") from None

    @staticmethod
    def labels_before_edits(request: Request, labelmap: Any, context: Any) -> Any:
        """The label map before the user's edits (array ``old_labels``, sent by the module) as the old labels of a
        case without a tumour segmentation; None when none was sent or the case has one (its segmentation says
        where the patient's tumour was, as on the command line without ``--old-labels``)."""
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.grid import LabelMap

        if "old_labels" not in request.arrays:
            return None
        array = take_array(request.arrays["old_labels"])  # taken (its file removed) even where it is not used
        if context.tumour is not None:
            return None
        if array.shape != labelmap.array.shape:
            raise MedSynthError(f"the label map before the edits {array.shape} is not on the label map's grid "
                                f"{labelmap.array.shape}")
        try:
            return LabelMap(array, labelmap.grid, [])
        except ValueError as exc:
            raise MedSynthError(f"the label map before the edits is not valid: {exc}") from None

    # --- operations ---------------------------------------------------------------------------

    def generate(self, request: Request) -> Event:
        """Synthesise a whole case, write its folder, answer with the four images as written."""
        from MedSynthLib.schema.volume_io import check_writable, compact_intensities
        from MedSynthLib.synthesis.synthesize import OUTPUT_NAMES, write_synthesis

        labelmap = self.labelmap(request)
        out = Path(request.params["out"])
        check_writable([out], False)
        if request.params.get("context"):
            return self.inpaint(request, labelmap, out)
        self.step(request, 0.05, "loading the model")
        _, engine = self.engine(request.params)
        self.step(request, 0.35, "model loaded")
        result = engine.synthesize(labelmap, seed=int(request.params.get("seed", 0)))
        self.step(request, 0.85, "synthesised")
        write_synthesis(result, out)
        arrays = {m: put_array(self.exchange, compact_intensities(result.images[m])) for m in OUTPUT_NAMES}
        return Event("result", request.id, fraction=1.0, text="written",
                     data={"out": str(out), "device": engine.device, "precision": engine.synth.precision,
                           "timings_s": result.provenance.get("timings_s", {})},
                     arrays=arrays)

    def inpaint(self, request: Request, labelmap: Any, out: Path) -> Event:
        """Generate for a real case: its images kept, the edited tumour region re-rendered (not anonymous)."""
        from MedSynthLib.synthesis.inpainting import inpaint_case, read_context, write_inpainted_case

        context = read_context(request.params["context"], labelmap)
        old = self.labels_before_edits(request, labelmap, context)
        self.step(request, 0.05, "loading the inpainting model")
        _, engine = self.inpainting_engine(request.params)
        self.step(request, 0.35, "model loaded")
        case = inpaint_case(engine, labelmap, context, old_labelmap=old, seed=int(request.params.get("seed", 0)))
        self.step(request, 0.85, "inpainted")
        write_inpainted_case(case, out)
        arrays = {m: put_array(self.exchange, case.images[m]) for m in case.images}
        return Event("result", request.id, fraction=1.0, text="written",
                     data={"out": str(out), "device": str(engine.synth.device), "precision": engine.synth.precision,
                           "timings_s": case.provenance.get("timings_s", {}), "inpainted": True,
                           "old_tumour": case.provenance["inpainting"]["old_tumour"],
                           "synthetic_voxels": int(case.region.sum())},
                     arrays=arrays)

    def supersede_previews(self, newest: int) -> None:
        """A newer preview arrived (called from the reading thread): stop the renders of the older ones."""
        with self._lock:
            older = {i for i in self._open_previews if i < newest}
            self.superseded |= older
            self.cancelled |= older
            self._open_previews.add(newest)

    def check(self, request: Request) -> None:
        """Raise :class:`Cancelled` when the request was cancelled (called between network layers)."""
        if request.id in self.cancelled:
            raise Cancelled()

    def preview(self, request: Request) -> Event:
        """Apply the request's label region to the session, render what changed, answer with that region.

        Params: ``session`` (the client's id of the case), ``reset`` (start the session: the
        label map is whole, with ``grid``), ``start`` (k, j, i of the label region), ``base`` (the
        session version the region applies to), ``seed``, ``margin``, ``renderer`` (name);
        ``history`` and ``privacy`` (the label map's records, with every request: read as Generate reads them);
        ``context`` (a real case folder: the inpainting renderer with ``inpainting_model``, the rule
        of Generate).
        Arrays: ``labels`` (the whole map, or the region); with ``reset`` and ``context``, ``old_labels``
        (:meth:`labels_before_edits`, as for Generate).
        """
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.provenance import PrivacyRecord
        from MedSynthLib.synthesis.inpainting import read_context
        from MedSynthLib.synthesis.preview import PreviewSession, make_renderer

        cpu, clock = time.process_time(), time.perf_counter()
        params = request.params
        context = params.get("context") or None
        if context:  # a real case: its own images, the edited region inpainted (as Generate does)
            key, engine = self.inpainting_engine(params)
            key += (engine.mirror_average,)  # the other setting renders other images: its preview starts again
            renderer_name, options = "inpainting", {"context": str(context)}
        else:
            key, engine = self.engine(params)
            key += (engine.appearance_spread, engine.synth.mirror_average)  # another case: its preview starts again
            renderer_name = params.get("renderer", "synthesis")
            options = {"seed": int(params.get("seed", 0)), "margin": int(params.get("margin", 24))}
        session_key = (key, str(params.get("session", "")), renderer_name, tuple(sorted(options.items())))
        old_tumour = None  # "old-labels" in the answer that starts a real case's preview with them
        if params.get("reset") or self._session is None or session_key != self._session_key:
            if not params.get("reset"):
                raise MedSynthError("the worker holds no preview of this case (it was restarted); preview again")
            labelmap = self.labelmap(request)
            made = dict(options)
            if context:  # read here: whether the case has a segmentation decides the old labels, as in Generate
                made["context"] = read_context(context, labelmap)
                old = self.labels_before_edits(request, labelmap, made["context"])
                made["old_labels"] = None if old is None else old.array
                old_tumour = "old-labels" if old is not None else None
            renderer = make_renderer(renderer_name, engine, **made)
            self._session, self._session_key = PreviewSession(renderer, labelmap), session_key
        else:
            session = self._session
            if int(params.get("base", -1)) != session.version:
                self._session, self._session_key = None, None
                raise MedSynthError(f"the worker's preview is at version {session.version}, the edit was made on "
                                    f"version {params.get('base')}; preview again")
            if "labels" not in request.arrays:
                raise MedSynthError("preview: the request carries no label region")
            region = take_array(request.arrays["labels"])
            session.set_labels(tuple(int(v) for v in params.get("start", (0, 0, 0))), region,
                               params.get("history"), PrivacyRecord.from_json(params.get("privacy")))
        session = self._session
        applied = time.perf_counter()
        # The labels are applied even when this request was superseded: the newer one builds on them.
        self.check(request)
        if not session.rendered:
            self.step(request, 0.2, "model loaded")  # a whole case follows: seconds, not a fraction of one
        network = _NetworkClock(engine.synth.generator)
        with network:
            update = session.render(lambda: self.check(request))
        rendered = time.perf_counter()
        arrays = {m: put_array(self.exchange, region) for m, region in update.regions.items()}
        packed = time.perf_counter()
        seconds = {"apply_labels": applied - clock, "render": rendered - applied, "network": network.seconds,
                   "send_arrays": packed - rendered, "worker_total": packed - clock}
        return Event("result", request.id, fraction=1.0, text="previewed",
                     data={"box": [list(update.box[0]), list(update.box[1])], "full": update.full,
                           "version": session.version, "seconds": round(packed - clock, 4),
                           "stages_s": {k: round(v, 4) for k, v in seconds.items()},
                           "worker_cpu_s": round(time.process_time() - cpu, 4), "device": str(engine.synth.device),
                           "renderer": renderer_name, **({"old_tumour": old_tumour} if old_tumour else {})},
                     arrays=arrays)

    def export(self, request: Request) -> Event:
        """MedSynthLib's export of one synthetic case folder."""
        from MedSynthLib.export import export_cases

        steps = iter((0.5, 1.0))
        targets = export_cases([request.params["case"]], request.params["folder"], request.params["format"],
                               naming=request.params.get("naming", "brats2021"),
                               progress=lambda label: self.step(request, next(steps, 1.0), label))
        return Event("result", request.id, fraction=1.0, text="exported", data={"targets": [str(t) for t in targets]})

    def handle(self, request: Request) -> None:
        from MedSynthLib.schema.errors import MedSynthError

        handler = {"generate": self.generate, "preview": self.preview, "export": self.export}.get(request.op)
        try:
            if request.id in self.cancelled and request.op != "preview":  # a preview's labels still apply
                raise Cancelled()
            if handler is None:
                raise MedSynthError(f"the worker cannot {request.op!r}")
            self.send(handler(request))
        except Cancelled:
            text = "preview superseded by a newer edit" if request.id in self.superseded else f"{request.op} cancelled"
            self.send(Event("cancelled", request.id, text=text))
        except (MedSynthError, ProtocolError) as exc:
            self.send(Event("error", request.id, text=str(exc)))
        except Exception as exc:  # noqa: BLE001 - report it in one line and keep serving
            traceback.print_exc(file=sys.stderr)
            self.send(Event("error", request.id, text=f"{type(exc).__name__}: {exc}"))
        finally:
            for ref in request.arrays.values():  # arrays a failed request did not take
                Path(ref.path).unlink(missing_ok=True)
            with self._lock:
                self.cancelled.discard(request.id)
                self.superseded.discard(request.id)
                self._open_previews.discard(request.id)


class _NetworkClock:
    """Seconds the generator's forward passes take inside the block (a hook before and after the top module)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.seconds = 0.0
        self._start = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> "_NetworkClock":
        def before(_module: Any, _inputs: Any) -> None:
            self._start = time.perf_counter()

        def after(_module: Any, _inputs: Any, _output: Any) -> None:
            self.seconds += time.perf_counter() - self._start

        self._handles = [self.module.register_forward_pre_hook(before), self.module.register_forward_hook(after)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--exchange", required=True, help="folder for array files (owned by the client)")
    args = parser.parse_args(argv)

    # The protocol owns the real stdout; anything else printed (libraries, warnings) goes to the log.
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def send(event: Event) -> None:
        with lock:
            protocol_out.write(encode(event) + "\n")
            protocol_out.flush()

    from MedSynthLib.synthesis.runtime import avoid_hugepage_stalls

    avoid_hugepage_stalls()  # this is MedSynth's own process, not Slicer's
    worker = Worker(Path(args.exchange), send)
    requests: queue.Queue[Request | None] = queue.Queue()

    def serve() -> None:
        while (request := requests.get()) is not None:
            worker.handle(request)

    thread = threading.Thread(target=serve, name="medsynth-worker", daemon=True)
    thread.start()
    send(Event("ready", 0, data={"pid": os.getpid(), "python": sys.version.split()[0], "started": time.time()}))
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            message = decode(line)
        except ProtocolError as exc:
            send(Event("error", 0, text=str(exc)))
            continue
        if not isinstance(message, Request):
            send(Event("error", 0, text="the worker takes requests, not events"))
            continue
        if message.op == "cancel":
            worker.cancelled.add(int(message.params.get("target", -1)))
        elif message.op == "quit":
            break
        else:
            if message.op == "preview":
                worker.supersede_previews(message.id)
            requests.put(message)
    requests.put(None)
    thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
