"""The dock's model and analysis-settings controls, and the rules between them.

The model (the one ``model_registry`` picks for the scan's contrast until the user chooses one,
or a checkpoint file), its card (a headline always, the whole card behind "Model details"), the
scorer the card proposes (and the lesion-direction switch for the one-way residual), samples,
noise level and device. Kept apart from the main widget because these rules change with the
model registry and the model cards, not with the dock's layout.

The main widget lays these widgets out (in its "Scan and model" fold); it tells the controls
when the scan changes and hears when the scorer changes (``on_scorer``: the presets and the
median switch follow it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, SpinBox

from . import model_card
from .errors import BrainUADError
from .model_registry import (
    default_model_name,
    guess_contrast,
    local_model_file,
    model_for_contrast,
    model_names,
    read_scan_contrast,
    scan_contrast,
)
from .scoring import SCORERS, scorer_names

FILE_CHOICE = "checkpoint file…"
# How a user of the dock overrides the model picked for the scan's contrast.
PICK_HINT = "choose another above"
WARNING_MARK = "⚠"  # starts a line of the model card that must stay in view
MODELS_T_TEST = "model's t_test"
ENSEMBLE_CHOICE = "250, 500, 750"  # analysis.NOISE_LEVEL_ENSEMBLE, as the list shows it


class ModelControls:
    """The model, its card and the analysis settings (not a widget itself: the dock lays out its
    widgets, so they share the fold's label column)."""

    def __init__(self, scan_layer: Callable[[], object]):
        self._scan_layer = scan_layer  # the dock's scan layer now (its contrast picks the model)
        self.model_choice = ComboBox(label="Model", choices=[*model_names(), FILE_CHOICE], value=default_model_name())
        self.model_file = FileEdit(label="Checkpoint", filter="*.safetensors", value="", visible=False)
        self.model_pick = Label(value="", visible=False)  # which model the scan's contrast picked, and why
        self.model_headline = Label(value="")  # the card's first line and any warning: always shown
        self.model_details = CheckBox(text="Model details", value=False,
                                      tooltip="the whole model card: what the model is and what it was trained on")
        self.model_info = Label(value="", visible=False)  # the whole card, behind "Model details"
        self.scorer = ComboBox(label="Scorer", choices=list(SCORERS), value=model_card.FALLBACK_SCORER)
        self.lesion_direction = CheckBox(
            text="Lesion direction only", value=False,
            tooltip="count only deviations the model's contrast gives lesions: darker on T1, brighter on T2/FLAIR")
        self.samples = SpinBox(label="Samples (N)", min=1, max=50, value=1)
        self.noise_levels = ComboBox(label="Noise level", choices=[MODELS_T_TEST, ENSEMBLE_CHOICE],
                                     value=MODELS_T_TEST)
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.settings_shown = CheckBox(value=False, tooltip="scorer, lesion direction, samples, noise level, device")
        self.settings_box = Container(widgets=[self.scorer, self.lesion_direction, self.samples, self.noise_levels,
                                               self.device], labels=True)
        self.settings_box.margins = (0, 0, 0, 0)
        self.metadata: dict = {}  # the chosen model's card, {} until it can be read
        self._resolved: dict[str, Path] = {}  # registry name -> verified local file
        # Until the user chooses a model, each scan gets its contrast's; their choice then holds.
        self.chosen_by_user = False
        self._picking_model = False  # the controls themselves are setting the model choice
        self.on_scorer: list[Callable[[], None]] = []  # the scorer (or the model's presets) changed
        self.model_choice.changed.connect(self._model_chosen)
        self.model_file.changed.connect(self._file_chosen)
        self.model_details.changed.connect(self._show_model_headline)
        self.scorer.changed.connect(self._scorer_changed)
        self.lesion_direction.changed.connect(self._lesion_direction_changed)

    @property
    def model_widgets(self) -> list:
        return [self.model_choice, self.model_file, self.model_pick, self.model_headline, self.model_details,
                self.model_info]

    @property
    def labels(self) -> list:
        """The texts that wrap in a narrow dock."""
        return [self.model_pick, self.model_headline, self.model_info]

    # ------------------------------------------------------------------ the scan picks a model

    def scan_changed(self) -> None:
        self._pick_model_for_scan()
        self.show_model_info()  # its warning depends on the scan's name

    def scan_contrast(self) -> str | None:
        """The chosen scan's contrast, as its layer's and file's names (or DICOM description) say."""
        layer = self._scan_layer()
        if layer is None:
            return None
        geometry = layer.metadata.get("nifti")
        return read_scan_contrast(geometry, layer.name) if geometry is not None else guess_contrast(layer.name)

    def _pick_model_for_scan(self):
        """Unless the user chose a model, the registry's model for the scan's contrast, and a line
        saying which and why."""
        if self.chosen_by_user or self._scan_layer() is None:
            self.model_pick.value, self.model_pick.visible = "", False
            return
        pick = model_for_contrast(self.scan_contrast())
        self.model_pick.value, self.model_pick.visible = pick.describe(PICK_HINT), True
        if pick.name in self.model_choice.choices and self.model_choice.value != pick.name:
            self._picking_model = True
            try:
                self.model_choice.value = pick.name
            finally:
                self._picking_model = False

    def _model_chosen(self, *_):
        """A model chosen in the list: by the user (it then holds for every scan), or by the dock
        for the scan's contrast."""
        if not self._picking_model:
            self.chosen_by_user = True
            self.model_pick.value, self.model_pick.visible = "", False
        self.model_changed()

    def model_source_for(self, path: str | Path, *names: str) -> str | Path | None:
        """The model a scan on disk would run with: the user's choice, else its contrast's."""
        if self.chosen_by_user:
            return self.model_source()
        return model_for_contrast(scan_contrast(path, *names)).name

    # ------------------------------------------------------------------ the model

    def _file_chosen(self, *_):
        """Choosing a checkpoint file selects it as the model."""
        if self._chosen_file() is not None and self.model_choice.value != FILE_CHOICE:
            self.model_choice.value = FILE_CHOICE
        else:
            self.model_changed()

    def _chosen_file(self) -> Path | None:
        value = self.model_file.value
        path = Path(value) if value else None
        return path if path is not None and str(path) not in ("", ".") and path.is_file() else None

    def model_source(self) -> str | Path | None:
        """What to resolve at Run: a registry name, or the chosen checkpoint file (None: none yet)."""
        if self.model_choice.value == FILE_CHOICE:
            return self._chosen_file()
        return self.model_choice.value

    def model_path(self) -> Path | None:
        """The model's local file when it is already here (bundled, cached, or chosen), else None."""
        source = self.model_source()
        if source is None or isinstance(source, Path):
            return source
        if source not in self._resolved:
            local = local_model_file(source)  # a damaged bundled file raises
            if local is None:
                return None
            self._resolved[source] = local
        return self._resolved[source]

    def model_changed(self, *_):
        """A new model: its card, its default scorer (with that scorer's number of
        reconstructions), and its calibrated thresholds."""
        self.model_file.visible = self.model_choice.value == FILE_CHOICE
        self.show_model_info()
        self._offer_scorers_of_model()
        directed = model_card.lesion_direction_scorer(self.metadata)
        self.lesion_direction.enabled = directed is not None
        scorer = directed if self.lesion_direction.value and directed else model_card.default_scorer(self.metadata)
        if self.metadata and scorer in SCORERS and self.scorer.value != scorer:
            self.samples.value = _samples_for(scorer)
            self.scorer.value = scorer  # its presets follow
        else:
            self._notify_scorer(presets_only=True)
        self._tick_lesion_direction()

    def _offer_scorers_of_model(self):
        """Only the scorers the chosen model can feed: those needing a map the kind does not
        make (SADM's segmentation, ...) are left out."""
        from .models import MODEL_KINDS

        kind = MODEL_KINDS.get((self.metadata or {}).get("kind"))
        choices = scorer_names(maps=kind.extra_maps) if kind is not None else list(SCORERS)
        if list(self.scorer.choices) != choices:
            with self.scorer.changed.blocked():
                current = self.scorer.value
                self.scorer.choices = choices
                self.scorer.value = current if current in choices else choices[0]

    def show_model_info(self):
        """The chosen model's card, as the "Model details" switch has it."""
        self._describe_model()
        self._show_model_headline()

    def _show_model_headline(self, *_):
        """The card's first line and its warnings always; the whole card when "Model details" is on.
        The switch shows only when the card says more than its headline."""
        lines = self.model_info.value.splitlines()
        headline = [line for index, line in enumerate(lines) if index == 0 or line.startswith(WARNING_MARK)]
        more = len(headline) < len(lines)
        self.model_details.visible = more
        self.model_info.visible = more and self.model_details.value
        self.model_headline.visible = not self.model_info.visible
        self.model_headline.value = "\n".join(headline)

    def _describe_model(self):
        """The chosen model's card (``model_info``, whole) and metadata, or why there is none."""
        from .checkpoint import read_metadata

        self.metadata = {}
        source = self.model_source()
        if source is None:
            self.model_info.value = "Choose a model checkpoint (.safetensors)."
            return
        try:
            path = self.model_path()
            if path is None:
                self.model_info.value = f"{source}: downloaded (hash-checked) when you press Run."
                return
            metadata = read_metadata(path)
        except BrainUADError as error:
            self.model_info.value = f"Not usable: {error}"
            return
        self.metadata = metadata
        mismatch = model_card.modality_mismatch(metadata, self.scan_contrast())
        self.model_info.value = model_card.summary(metadata) + (f"\n{WARNING_MARK} {mismatch}" if mismatch else "")

    # ------------------------------------------------------------------ the scorer

    def _notify_scorer(self, *, presets_only: bool = False) -> None:
        for callback in list(self.on_scorer):
            callback(presets_only)

    def _scorer_changed(self, *_):
        """The lesion-direction option shows whether the scorer is the one-way residual, whoever
        chose it; the presets and the median switch follow (``on_scorer``)."""
        self._tick_lesion_direction()
        self._notify_scorer()

    def _tick_lesion_direction(self):
        directed = model_card.lesion_direction_scorer(self.metadata)
        ticked = directed is not None and self.scorer.value == directed
        if self.lesion_direction.value != ticked:
            with self.lesion_direction.changed.blocked():
                self.lesion_direction.value = ticked

    def _lesion_direction_changed(self, *_):
        """On: the one-way residual of the model's contrast; off: the model's default scorer, or
        the two-way residual when that default is the one-way one."""
        directed = model_card.lesion_direction_scorer(self.metadata)
        default = model_card.default_scorer(self.metadata)
        if self.lesion_direction.value and directed:
            scorer = directed
        else:
            scorer = "residual" if default == directed else default
        if scorer in SCORERS and scorer != self.scorer.value:
            self.samples.value = _samples_for(scorer)
            self.scorer.value = scorer  # its presets follow

    # ------------------------------------------------------------------ the settings

    def settings_summary(self) -> str:
        """The analysis settings in one line, for the folded switches."""
        noise = "" if self.noise_levels.value == MODELS_T_TEST else f", t = {self.noise_levels.value}"
        return f"{self.scorer.value}, N = {self.samples.value}{noise}, {self.device.value}"

    def analysis_settings(self, median: bool):
        """What a run uses: the user's choices, through the one rule every door follows."""
        from .analysis import NOISE_LEVEL_ENSEMBLE, AnalysisSettings  # torch and MONAI: only when a run starts

        levels = None if self.noise_levels.value == MODELS_T_TEST else NOISE_LEVEL_ENSEMBLE
        return AnalysisSettings.for_model(self.metadata, scorer=self.scorer.value, samples=self.samples.value,
                                          noise_levels=levels, device=self.device.value, median=median)


def _samples_for(scorer: str) -> int:
    from .analysis import AnalysisSettings  # torch and MONAI: only once a model is chosen

    return AnalysisSettings.samples_for(scorer)
