"""``medsynth review``: start the review page or a reader study on a local web server.

MedSynthLib's command line parses the arguments and calls :func:`serve` here only when the web
extra is installed, so ``medsynth`` itself never imports the Slicer libraries.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from MedSynthLib.evaluation.reader_study import ReaderStudy, find_pairs, is_synthetic_case, open_case
from MedSynthLib.schema.errors import InputError, MedSynthError

from .review_app import ReviewEntry


def review_entries(case_dirs: list[Path], pairs: list[tuple[Path, Path]]) -> list[ReviewEntry]:
    """One entry per synthetic case (with its real case when paired) and per real case left alone.

    Pairs come from ``--pair SYNTHETIC REAL``, or from the cases given: a real case with the synthetic case's
    brain outline (its anatomy was derived from that case), else with its tumour in place, is the case it was
    made from (:func:`~MedSynthLib.evaluation.reader_study.find_pairs`; compared by content, as provenance names
    no patient).  The folders are checked before the server starts.
    """
    for folder in [*case_dirs, *(p for pair in pairs for p in pair)]:
        if not Path(folder).is_dir():
            raise InputError(folder, "case folder not found")
    real_of: dict[Path, Path] = {}
    for synthetic, real in pairs:
        if not is_synthetic_case(synthetic):
            raise InputError(synthetic, "--pair takes the synthetic case first (a MedSynth synthetic case folder)")
        real_of[Path(synthetic).resolve()] = Path(real).resolve()
    synthetic_dirs = list(dict.fromkeys(Path(d).resolve() for d in case_dirs if is_synthetic_case(d)))
    synthetic_dirs += [s for s in real_of if s not in synthetic_dirs]
    real_dirs = list(dict.fromkeys(Path(d).resolve() for d in case_dirs if not is_synthetic_case(d)))
    unpaired = [folder for folder in synthetic_dirs if folder not in real_of]
    compare = set(unpaired + real_dirs) if unpaired and real_dirs else set()
    opened = {folder: open_case(folder, with_brain=folder in compare)
              for folder in dict.fromkeys([*synthetic_dirs, *real_dirs, *real_of.values()])}
    if compare:
        found = find_pairs([opened[f] for f in real_dirs], [opened[f] for f in unpaired])
        for pair in sorted(found, key=lambda p: "brain" not in p["shares"]):  # the brain says whose case it is
            real_of.setdefault(Path(pair["synthetic"]), Path(pair["real"]))
        for case in opened.values():
            case.brain = None  # what the pairing needed: not kept while the page is served
    used_real = set(real_of.values())
    entries = []
    for folder in synthetic_dirs:
        real = real_of.get(folder)
        entries.append(ReviewEntry(folder.name + (f"  (real: {real.name})" if real else ""),
                                   opened[folder], opened[real] if real else None))
    for folder in real_dirs:
        if folder not in used_real:
            entries.append(ReviewEntry(f"{folder.name}  (real)", None, opened[folder]))
    if not entries:
        raise MedSynthError("no case to review: give synthetic or real case folders")
    return entries


def check_listen_address(host: str, port: int) -> None:
    """Fail with one line, before the page is built, where the server could not listen (an unknown host, a port
    in use or not allowed); the web server itself would only log the error and return."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as exc:
        raise MedSynthError(f"--host {host}: not an address to listen on ({exc})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does
        try:
            probe.bind(address)
        except OSError as exc:
            raise MedSynthError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None


def serve(args: argparse.Namespace) -> int:
    """Build the page the arguments ask for and serve it until interrupted."""
    check_listen_address(args.host, args.port)
    if args.study:
        if not args.synthetic or args.output is None:
            raise MedSynthError("a reader study needs --synthetic SYN_DIR... and -o RESULTS_DIR")
        study = ReaderStudy.create_or_resume(args.output, args.study, args.synthetic, seed=args.seed,
                                             n_per_class=args.n_per_class, allow_paired=args.allow_paired)
        try:
            from .study_app import StudyApp

            app = StudyApp(study)
            what = f"reader study ({len(study.answered())} of {len(study.items)} answered) in {args.output}"
            _start(app, args, what)
        finally:
            study.close()  # the results folder is held for the server's lifetime, released when it stops
        return 0
    else:
        entries = review_entries(list(args.cases), [tuple(p) for p in (args.pair or [])])
        from .review_app import ReviewApp

        app = ReviewApp(entries)
        _start(app, args, f"review of {len(entries)} case(s)")
    return 0


def _start(app: object, args: argparse.Namespace, what: str) -> None:
    from .access import protect

    access = protect(app.server, args.host, args.port)  # no other web page or local program may use the server
    print(f"medsynth review: {what} at {access.address(args.host)} (Ctrl+C stops)", flush=True)
    sys.argv = sys.argv[:1]  # the trame server reads its own options from sys.argv: give it none
    app.server.start(port=args.port, host=args.host, open_browser=False, show_connection_info=False)
