# chiptag: `make demo` trains the embedded default; `make test` runs the test suite.
# The first target that needs it creates .venv with pip (torch/torchvision come from the pinned wheels).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DATA := data/demo

.PHONY: venv demo test test-all bench bench-gpu bench-scale clean

$(BIN)/chiptag: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[export,clearml,serve,timm,test]"
	touch $(BIN)/chiptag

venv: $(BIN)/chiptag

$(DEMO_DATA)/train_classes.csv: | venv
	$(BIN)/chiptag demo-data $(DEMO_DATA) --n 2000 --size 128 --seed 0

demo: venv $(DEMO_DATA)/train_classes.csv
	$(BIN)/chiptag train -c configs/demo.yaml

# pytest exits 5 when it collected no test: that is a failure, not a pass.
test: venv
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# Everything, including every registered torchvision backbone (pyproject's all_backbones marker; minutes, and
# several GB of memory for the largest: vit_h_14, regnet_y_128gf).
test-all: venv
	$(BIN)/python -m pytest -q -m "all_backbones or not all_backbones"

# Naive frozen loop vs chiptag's feature cache (cold and warm), one process; prints a table, writes the JSON.
bench: venv
	$(BIN)/python benchmarks/frozen_training.py --n 400 --size 128 --image-size 128 --epochs 5 \
		--out benchmarks/results/frozen_training.json

# The GPU pipeline (nvJPEG extraction, fine-tuning, prediction) against the bare forward/train step, ResNet50 @224
# from 256 px chips. Without CUDA it prints one line and exits 0.
bench-gpu: venv
	$(BIN)/python benchmarks/gpu_pipeline.py --n 4000 --size 256 --image-size 224 --backbone resnet50 \
		--out benchmarks/results/gpu_pipeline.json

# 40,479 generated chips (the real dataset's size) at 64 px; frozen resnet18, resnet50, efficientnet_b0/b1,
# each trained twice (the second run reuses the feature cache). Prints a table and the total time.
bench-scale: venv
	$(BIN)/python benchmarks/scale.py --n 40479 --size 64 --epochs 10 --work .cache/bench-scale \
		--out benchmarks/results/scale.json

clean:
	rm -rf runs .cache data/demo
