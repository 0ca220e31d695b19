"""The dock's state (dock_state.DockState), Qt-free: one current entry, one session, and the
callbacks the dock's parts follow it by."""

from napari_brain_uad.dock_state import DockState


class _Layer:
    def __init__(self, unique_id):
        self.unique_id = unique_id


def test_callbacks_fire_on_each_change():
    state = DockState()
    seen = []
    state.on_status.append(lambda text: seen.append(("status", text)))
    state.on_session.append(lambda session: seen.append(("session", session)))
    state.on_edit.append(lambda: seen.append(("edit",)))

    state.status = "Running…"
    session = object()  # the state keeps a session without looking into it
    state.session = session
    state.edited()
    state.clear_session()

    assert seen == [("status", "Running…"), ("session", session), ("edit",), ("session", None)]
    assert state.status == "Running…" and state.session is None


def test_one_current_entry_and_its_kept_session():
    state = DockState()
    state.open_entry("sub-01", scan_layer_id=1)
    state.session_kept = True  # the worklist saved its results
    assert state.entry == "sub-01" and state.is_entry_layer(_Layer(1)) and not state.is_entry_layer(_Layer(2))

    state.open_entry("sub-02", scan_layer_id=2)
    assert state.entry == "sub-02"
    assert not state.session_kept  # nothing is saved for the new scan until its session is kept
    assert not state.is_entry_layer(_Layer(1)) and state.is_entry_layer(_Layer(2))

    state.open_entry(None)  # no worklist scan in view: no layer is the entry's
    assert state.entry is None and not state.is_entry_layer(_Layer(None))


def test_unexported_edits_are_kept_per_layer_until_exported():
    state = DockState()
    edits = []
    state.on_edit.append(lambda: edits.append(1))
    state.record_edit("a", "sub-01 annotation")
    state.record_edit("b", "sub-02 annotation")
    assert state.unsaved and state.unexported_layers() == ["sub-01 annotation", "sub-02 annotation"]
    assert edits == []  # recording is not announcing: a decision announces once, when whole
    state.mark_exported("a")
    assert state.unexported_layers() == ["sub-02 annotation"]
    state.forget_unexported()
    assert not state.unsaved


def test_each_dock_has_its_own_state():
    one, other = DockState(), DockState()
    one.status = "Done"
    one.open_entry("sub-01")
    assert other.status == "" and other.entry is None
