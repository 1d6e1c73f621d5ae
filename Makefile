# The two commands a new machine needs: `make demo` (sample dump → ingest → query) and `make test`.
# Each creates .venv when pyproject.toml changed; everything runs offline with the tiny profile.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-install
DEMO    ?= data/demo
N       ?= 200
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test lint docs dictionary install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@test -f $(DEMO)/dump/metadata.json || \
		$(BIN)/mmrag sample-dump $(DEMO)/dump --n $(N) --with-bad
	@test -f $(DEMO)/queries.jsonl || \
		$(BIN)/mmrag sample-queries $(DEMO)/queries.jsonl --dump $(DEMO)/dump
	MMRAG_PROFILE=tiny MMRAG_DB=$(DEMO)/lancedb $(BIN)/mmrag ingest $(DEMO)/dump
	MMRAG_PROFILE=tiny MMRAG_DB=$(DEMO)/lancedb MMRAG_OUT=$(DEMO)/out \
		$(BIN)/mmrag query $(DEMO)/queries.jsonl --run-id demo
	MMRAG_PROFILE=tiny MMRAG_DB=$(DEMO)/lancedb MMRAG_OUT=$(DEMO)/out \
		$(BIN)/mmrag evaluate --answers demo --clip-score --eval-id demo
	MMRAG_PROFILE=tiny MMRAG_DB=$(DEMO)/lancedb MMRAG_OUT=$(DEMO)/out \
		$(BIN)/mmrag report demo --overview
	$(BIN)/python -m mmrag.examples $(DEMO)/lancedb $(DEMO)/out

# the layer contracts (pyproject [tool.importlinter]), then the suite (it builds the docs too)
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# the documentation site (mkdocs.yml) into data/site/; broken links fail the build
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# regenerate the data dictionary page's generated block after changing a contract in schemas/
dictionary: $(STAMP)
	$(BIN)/mmrag schema --readme docs/reference/data-dictionary.md

clean:
	rm -rf data out .pytest_cache .ruff_cache
