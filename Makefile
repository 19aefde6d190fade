# make demo: install, then prepare -> train -> caption on the built-in shapes set (offline).
# make test: install, then the whole test suite (offline), as CI runs it.
# make rehearse: the real architectures (ViT-B/16 + GPT-2 124M, random weights) through every script.
# make check-demo: make demo, then the checks that need its trained model (int8's quality bar).
# make app: the demo page (app.py) on the demo's model, making it first (make demo) if missing.
# make test-fast: the fast tier only (in-memory tiny models; no pipeline runs, servers or torchrun).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := data/demo

.PHONY: demo check-demo app test test-fast rehearse install clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: install
	$(PY) dataloader.py --source shapes --coco_dir $(DEMO)/shapes_coco --save_path $(DEMO)/processed \
		--encoder_model tiny --decoder_model tiny --val_size 50 --test_size 100 --overwrite --quiet
	$(PY) train.py --data_path $(DEMO)/processed --output_dir $(DEMO)/model --overwrite \
		--epochs 40 --batch_size 16 --lr 1e-3 --warmup_steps 50 --logging_steps 100 --run_name demo --quiet
	$(PY) inference.py --model_path $(DEMO)/model \
		--image_path $(DEMO)/shapes_coco/val2014/COCO_val2014_000000500000.jpg \
		$(DEMO)/shapes_coco/val2014/COCO_val2014_000000500001.jpg \
		$(DEMO)/shapes_coco/val2014/COCO_val2014_000000500002.jpg
	$(PY) -c "import json; m = json.load(open('$(DEMO)/model/metrics.json'))['test']; \
		print('test BLEU-4 %.4f  CIDEr %.3f  (from $(DEMO)/model/metrics.json)' % (m['bleu4'], m['cider']))"

app: install
	@test -f $(DEMO)/model/config.json || $(MAKE) demo
	$(PY) app.py --model_path $(DEMO)/model

test: install
	$(PY) -m pytest -q -m "not rehearsal and not demo" tests

test-fast: install
	$(PY) -m pytest -q -m "not slow and not rehearsal and not demo" tests

check-demo: demo
	$(PY) -m pytest -q -s -m demo tests

rehearse: install
	$(PY) -m pytest -q -s -m rehearsal tests

clean:
	rm -rf $(VENV) data runs
