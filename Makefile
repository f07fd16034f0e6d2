# The two commands of the contract: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint format migrate check-python clean worker beat vendor-static

check-python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed; set PYTHON=/path/to/python3.11")'

$(BIN)/python: | check-python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

migrate: $(VENV)/.installed
	$(BIN)/python manage.py migrate --noinput

run: migrate
	$(BIN)/python manage.py collectstatic --noinput -v0
	$(BIN)/python manage.py seed_demo
	@echo
	@echo "Spend Governance on http://$(HOST):$(PORT)/"
	@echo "  console:  http://$(HOST):$(PORT)/console/"
	@echo "  admin:    http://$(HOST):$(PORT)/admin/"
	@echo "  API docs: http://$(HOST):$(PORT)/api/docs/"
	@echo "  gateway:  http://$(HOST):$(PORT)/v1/chat/completions (Mistral-compatible)"
	@echo "  a key:    $(BIN)/python manage.py create_agent_key --tenant cus_demo --agent invoice-bot"
	@echo
	$(BIN)/python manage.py serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest

# Scale-out: run these (any number of workers, one beat) against REDIS_URL and
# DATABASE_URL, and `manage.py serve --no-periodic` (or uvicorn) for the web processes.
worker: migrate
	$(BIN)/celery -A governance worker --loglevel info

beat: migrate
	$(BIN)/celery -A governance beat --loglevel info \
		--scheduler django_celery_beat.schedulers:DatabaseScheduler

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The console's JavaScript (Chart.js, htmx) is committed under governance/static/vendor/;
# this downloads the pinned versions again from the npm registry and verifies them.
vendor-static: | check-python
	$(PYTHON) scripts/vendor_static.py

clean:
	rm -rf $(VENV) var/static
