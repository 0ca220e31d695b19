# Set-up, launch and tests. The README's two commands are `make napari` and `make test`;
# `make docs` builds the documentation site in docs/.

PYTHON ?= python3
VENV := .venv
# Pinned so a machine holding a local CPU wheel of this version (as our development machines do)
# installs that one instead of downloading CUDA packages; elsewhere pip takes PyPI's usual build.
# Override with `make napari TORCH=torch` for the newest release.
TORCH ?= torch==2.13.0
SAMPLE ?= mslub-patient26

# The project's real scans live beside the repository in development and CI; when they are
# there, samples and tests read them instead of downloading.
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(NAPARI_BRAIN_UAD_DATA),)
ifneq ($(wildcard $(SHARED_DATA)/README.md),)
export NAPARI_BRAIN_UAD_DATA := $(SHARED_DATA)
endif
endif

.PHONY: setup napari test docs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install "$(TORCH)" -e ".[all,dev]"
	touch $@

# napari with the plugin's widget, on a real sample scan (fetched, or read from the local folder).
napari: setup
	$(VENV)/bin/napari $$($(VENV)/bin/brain-uad-sample $(SAMPLE)) --plugin napari-brain-uad -w napari-brain-uad

# The whole test suite; Qt tests need a display, so without one it runs under Xvfb
# (installed first when missing: see scripts/install-system-deps.sh).
test: setup
ifeq ($(DISPLAY),)
# On Debian/Ubuntu the script adds whatever is missing (Xvfb or one of Qt's xcb libraries) and
# does nothing when all is there; elsewhere it runs only when there is no Xvfb at all.
	if command -v dpkg >/dev/null || ! command -v xvfb-run >/dev/null; then bash scripts/install-system-deps.sh; fi
	xvfb-run -a -s "-screen 0 1280x1024x24" $(VENV)/bin/python -m pytest
else
	$(VENV)/bin/python -m pytest
endif

# The documentation site (Sphinx, pages in MyST Markdown) for reading offline:
# open docs/_build/html/index.html. Warnings are errors, as in the test that builds it.
docs: setup
	$(VENV)/bin/python -m sphinx -b html -W --keep-going -n docs docs/_build/html
