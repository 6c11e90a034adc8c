"""µ-VLA's downstream tasks: VQA v2, NLVR2, SNLI-VE and RefCOCO+ (readers, heads' targets, metrics).

Every reader, of the real formats or of the embedded world's task configs, returns the same
`jaxmuvla.tasks.common.TaskExamples`, so fine-tuning (`jaxmuvla.finetune`) sees one shape.
"""
