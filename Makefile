# Two commands for a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data browser demo test test-quick bench docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench,docs]"
	touch $@

# Debian's Fashion-MNIST package, where this machine can install it (root and apt-get);
# otherwise ddpm finds or downloads the files itself (see docs/guides/data.md).
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST: $(FMNIST)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) \
	  || echo "note: could not install dataset-fashion-mnist; ddpm will look elsewhere"; \
	else echo "note: not root or no apt-get; ddpm will look for Fashion-MNIST elsewhere"; fi

# Debian's Chromium for the web page's browser tests (Playwright drives it; its own browser
# download needs the internet), where this machine can install it (root and apt-get).
browser:
	@if command -v chromium >/dev/null; then echo "Chromium: $$(command -v chromium)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq chromium || (apt-get update -qq && apt-get install -y -qq chromium)) \
	  || echo "note: could not install chromium; the browser tests will fail and say how to get it"; \
	else echo "note: not root or no apt-get; install chromium for the browser tests (tests/ui/test_ui_browser.py)"; fi

demo: setup data
	$(VENV)/bin/ddpm demo

test: setup data browser
	$(PY) -m pytest -q

# the same without the long tests (marked slow): a quick check while working
test-quick: setup data
	$(PY) -m pytest -q -m "not slow"

# The quick benchmark suite (the speed ratios against the seed's code, the sampler oracle) into
# bench/out/bench-TIME/, never into the committed bench/results/; `bench/run.py --list` for more.
bench: setup data
	$(PY) bench/run.py quick

# The documentation site, offline and strict (a broken link is an error), into site/.
docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs bench/out site .pytest_cache
