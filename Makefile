# The everyday commands, from the repository root. The tools of ./.venv are used when it exists.
# See "Developing" in README.md.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export MPLBACKEND ?= Agg

.PHONY: export test test-fast test-gpu bench bench-quick docs readme tutorials

export:     ## notebooks -> fastai_gray/*.py, notebooks cleaned
	nbdev-export && nbdev-clean

test:       ## tests/, every notebook, the docs site in headless Chromium (skipped without Chromium, except in CI)
	python -m pytest

test-fast:  ## the everyday tier: no training runs, no long notebooks, no browser (markers in setup.cfg)
	python -m pytest -m "not slow and not browser"

test-gpu:   ## the GPU tier (marker cuda): tests/test_gpu.py and the CUDA checks of tests/test_devices.py, sized for under 5 minutes on one GPU (tiny data); skipped where torch sees no GPU, failing instead with CI_GPU=true (python3: a bare GPU machine may have no `python`)
	python3 -m pytest -m cuda -p no:cacheprovider tests/test_gpu.py tests/test_devices.py

bench:      ## the full benchmark the docs quote, into nbs/bench/, then README.md from it (32 minutes on 2 idle cores); the segment and onnx stages add about 11, the cache stage 6 (the gpu stage measures only where CUDA is present)
	fastai-gray bench && python tools/docs.py readme

bench-quick: ## the quick benchmark, into nbs/bench/quick/ (git ignores it; 6 to 12 minutes measured on 2 busy cores)
	fastai-gray bench --quick

docs:       ## the docs site into _docs/, offline (nbdev processing + smalldocs)
	python tools/docs.py build

readme:     ## README.md from nbs/index.ipynb
	python tools/docs.py readme

tutorials:  ## run the tutorials and keep their outputs (figures, tables) for the docs
	python tools/docs.py run nbs/tutorials/*.ipynb && nbdev-clean
