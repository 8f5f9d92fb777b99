# The two commands of the README. Both create .venv on a fresh clone and install the project
# with this machine's torch pin (constraints.txt); GPU clusters install with their own torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := runs/demo

.PHONY: demo test test-slow install clean-demo

$(BIN)/layton: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/layton

# The main job on the embedded default: the bundled tiny workflow (tiny model zoo, local Ray, bundled
# prompts) from synthesis to evaluation tables and runs/demo/report.html. A rerun resumes/skips.
demo: install
	$(BIN)/layton workflow run workflows/demo.yaml

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean-demo:
	rm -rf $(DEMO)
