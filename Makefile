# Two entry points (see README): `make demo` and `make test`. Each sets up
# .venv first (uv, a few seconds when cached) and is safe to run again.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned in pyproject.toml. Where a directory of local wheels exists
# (this project's CPU machines keep the CPU torch there) uv looks in it too;
# TORCH_INDEX picks another build, e.g. https://download.pytorch.org/whl/cpu
# or .../whl/cu128.
WHEELS      ?= $(wildcard /opt/wheels)
TORCH_INDEX ?=
UV_FLAGS := $(if $(WHEELS),--find-links $(WHEELS)) \
            $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match)

.PHONY: setup demo test browser clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install --quiet uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(UV_FLAGS) -e ".[test]"
	touch $@

demo: setup
	$(BIN)/structure-sweep run search_spaces/demo.yaml

# The report's browser test needs Chromium (Debian's package; root installs it).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
