# Set-up and entry points. `make demo` and `make test` install whatever is
# missing first; a second `make install` with nothing to do is a no-op.
SHELL := /bin/bash
VENV := .venv
VENV_K2 := .venv-k2
APT_PACKAGES := flite espeak-ng sox libsox-fmt-all flac festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts

.PHONY: install apt demo test bench

install: apt $(VENV)/.installed $(VENV)/.editable $(VENV_K2)/.installed

apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian packages: $(APT_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  else \
	    echo "Missing Debian packages; run:"; \
	    echo "  sudo apt-get update && sudo apt-get install -y $(APT_PACKAGES)"; exit 1; \
	  fi; \
	fi

$(VENV)/.installed: requirements.txt constraints.txt
	test -x $(VENV)/bin/python || $$(utils/find_python.sh 3.11) -m venv $(VENV)
	$(VENV)/bin/pip install -q 'pip<25'
	$(VENV)/bin/pip install -q -r requirements.txt -c constraints.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt constraints.txt $(VENV)/.installed
	$(VENV)/bin/pip install -q -r requirements-test.txt -c constraints.txt
	touch $@

$(VENV)/.editable: setup.py $(VENV)/.installed
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(VENV_K2)/.installed: requirements-k2.txt
	test -x $(VENV_K2)/bin/python || $$(utils/find_python.sh 3.9) -m venv $(VENV_K2)
	$(VENV_K2)/bin/pip install -q -r requirements-k2.txt
	touch $@

demo: install
	cd egs/librispeech_fl && ./run.sh --stage 0 --stop_stage 7

# Two pytest workers, one per core (tests run single-threaded; a third made the suite slower, 21.9
# min against 20.4); a file's tests share one worker and so its module fixtures; files start in
# collection order, slowest first (tests/conftest.py).
test: install $(VENV)/.test-installed
	$(VENV)/bin/python -m pytest -x -q -n 2 --dist loadfile --no-loadscope-reorder tests

bench: install
	$(VENV)/bin/python bench/split_clients.py
	$(VENV)/bin/python bench/aggregation_memory.py
	$(VENV)/bin/python bench/fl_overhead.py
	$(VENV)/bin/python bench/distributed.py
