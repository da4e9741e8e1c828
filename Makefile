# The everyday commands, from the repository root. The tools of ./.venv are used when it exists.
# See "Developing" in README.md.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export MPLBACKEND ?= Agg

.PHONY: export test test-fast bench bench-quick docs readme tutorials

export:     ## notebooks -> fastai_gray/*.py, notebooks cleaned
	nbdev-export && nbdev-clean

test:       ## tests/, every notebook, the docs site in headless Chromium
	python -m pytest

test-fast:  ## the everyday tier: no training runs, no long notebooks, no browser
	python -m pytest -m "not slow and not browser"

bench:      ## the benchmark the docs show, into nbs/bench/ (about 45 minutes on 2 idle cores)
	fastai-gray bench

bench-quick: ## the quick benchmark (under 10 minutes), into nbs/bench/quick/
	fastai-gray bench --quick --out nbs/bench/quick

docs:       ## the docs site into _docs/, offline (nbdev processing + smalldocs)
	python tools/docs.py build

readme:     ## README.md from nbs/index.ipynb
	python tools/docs.py readme

tutorials:  ## run the tutorials and keep their outputs (figures, tables) for the docs
	python tools/docs.py run nbs/tutorials/*.ipynb && nbdev-clean
