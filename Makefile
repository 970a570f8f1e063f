# The two set-up commands of the README: `make compare` (the main job) and `make test` (the test suite).
# Both create .venv on first use with the pinned versions of constraints.txt.
PY ?= python3
VENV ?= .venv
EXTRAS ?= all,test
STAMP = $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma := ,

.PHONY: compare test install report clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

compare: $(STAMP)
	$(VENV)/bin/harness compare --model mnist_mlp $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

report: $(STAMP)
	$(VENV)/bin/harness report

clean-venv:
	rm -rf $(VENV)
