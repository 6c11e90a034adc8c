# Fine-tuning a µ-VLA pre-trained on real data (configs/muvla_vinvl.py) on the real downstream
# datasets, with VinVL region features of their images. The argument names the task.
#
#   python -m vlcore.main --config=configs/muvla_finetune_vinvl.py:vqa --workdir=runs/vqa \
#     --config.init=runs/muvla --config.pretrain.corpus.dir=/data/muvla_corpus \
#     --config.pretrain.model.init=/models/bert-base-uncased \
#     --config.data.files='train=/data/vqa/v2_OpenEnded_mscoco_train2014_questions.json,/data/vqa/v2_mscoco_train2014_annotations.json;val=/data/vqa/v2_OpenEnded_mscoco_val2014_questions.json,/data/vqa/v2_mscoco_val2014_annotations.json' \
#     --config.data.features=/data/coco/features.tsv --config.data.predictions=/data/coco/predictions.tsv
#
# data.files per task: vqa QUESTIONS.json,ANNOTATIONS.json; nlvr2 and ve the split's jsonl;
# refcoco "refs(unc).p,instances.json" for every split (with --config.data.allow_pickle=True: the
# refs file is a pickle, read by a restricted unpickler that admits plain data only). The
# --config.pretrain.* flags are those that trained --config.init (they rebuild its model).
# The VQA results file (official format) and per-example scores land in <workdir>/results.
import importlib.util
from pathlib import Path

from jaxmuvla.finetune import default_config

EVAL_SPLITS = {"vqa": ["val"], "nlvr2": ["dev"], "ve": ["dev"], "refcoco": ["val", "testA", "testB"]}
LEARNING_RATES = {"vqa": 5e-5, "nlvr2": 3e-5, "ve": 3e-5, "refcoco": 5e-5}  # UNITER-style schedules


def get_config(arg=None):
    task = arg or "vqa"
    spec = importlib.util.spec_from_file_location("muvla_vinvl", Path(__file__).with_name("muvla_vinvl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = default_config()
    config.downstream = task
    config.name = task
    config.pretrain = module.get_config()
    config.data.source = "real"
    config.data.files = "REQUIRED"
    config.data.features = "REQUIRED"
    config.data.predictions = "REQUIRED"
    config.eval_splits = EVAL_SPLITS.get(task, [])
    config.max_text_tokens = 40
    config.batch_size = 256
    config.num_steps = 10_000
    config.optimizer.lr = LEARNING_RATES.get(task, 5e-5)
    config.optimizer.warmup_steps = 1_000
    config.log_every = 100
    config.save_every = 1_000
    return config
