"""The one exception the module shows to the user."""

from __future__ import annotations

import re

#: Command-line hints of MedSynthLib's messages and what a Slicer user does instead.
_GUI_EQUIVALENTS = (
    (re.compile(r"\s*\(choose (?:another )?with --label-convention\)"), " (choose another 'Tumour labels' convention)"),
    (re.compile(r"\s*\(choose with --convention\)"), " (rename the files to one naming)"),
    (re.compile(r"\s*\(use --resample to resample\)"), " (resample it onto the T1 first)"),
    (re.compile(r"\s*\(use --overwrite[^)]*\)"), ""),
    # Inpainting a real case (MedSynthLib.synthesis.inpainting.plan_region): the panel sends the map before the
    # edits itself, so its refusals say what the user did (undo back to it) or can do, in the panel's terms.
    (re.compile(r"the label map equals the label map before the edit \(--old-labels\): nothing to re-render "
                r"\(([^()]*)\); edit the tumour first"),
     r"nothing was edited: draw, move or erase a tumour first (the label map is as prepared: \1)"),
    (re.compile(r";\s*give --old-labels \([^()]*\), or make a whole synthetic case \(in Slicer: ([^()]*)\)"),
     r"; MedSynth does not know this label map as it was before your edits: prepare it again from the case and "
     r"redo the edits, or choose \1"),
)
#: Any other parenthesised hint naming an option, and a trailing "see --help".
_OPTION_HINT = re.compile(r"\s*\([^()]*(?<![\w-])--[a-z][\w-]*[^()]*\)")


def without_command_line_hints(text: str) -> str:
    """A message with MedSynthLib's command-line hints (``--option``) replaced or removed.

    The module shows backend messages to people who never see a command line,
    so a hint such as "(use --resample to resample)" becomes what to do in
    Slicer, or goes.
    """
    for pattern, replacement in _GUI_EQUIVALENTS:
        text = pattern.sub(replacement, text)
    return _OPTION_HINT.sub("", text)


class WorkflowError(RuntimeError):
    """Bad input or a failed step in the Slicer module.

    The Logic raises it with one clear sentence (what is wrong and what to do);
    the widget shows ``str(error)`` in a message box, so command-line hints are
    taken out of the message here.  Whenever it is raised the scene is left as
    it was before the call.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(without_command_line_hints(str(message)))


class CancelledError(WorkflowError):
    """The user cancelled a running synthesis or export."""
