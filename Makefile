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

# The main job on the embedded default: tiny model zoo, local Ray, bundled prompts.
demo: install
	$(BIN)/layton models tiny $(DEMO)/zoo --if-missing
	$(BIN)/layton synth workflows/synth_demo.yaml
	$(BIN)/layton shards stats $(DEMO)/shards
	$(BIN)/layton train tokenizer workflows/tokenizer_demo.yaml
	$(BIN)/layton train gen workflows/gen_demo.yaml
	$(BIN)/layton generate --prompts workflows/data/gen_prompts.txt -o $(DEMO)/generate --size 128
	$(BIN)/layton eval recon workflows/eval_recon_demo.yaml
	$(BIN)/layton eval geneval workflows/eval_geneval_demo.yaml

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean-demo:
	rm -rf $(DEMO)
