"""The one exception the module shows to the user."""

from __future__ import annotations


class WorkflowError(RuntimeError):
    """Bad input or a failed step in the Slicer module.

    The Logic raises it with one clear sentence (what is wrong and what to do);
    the widget shows ``str(error)`` in a message box.  Whenever it is raised the
    scene is left as it was before the call.
    """


class CancelledError(WorkflowError):
    """The user cancelled a running synthesis or export."""
