"""The pipeline scheduler: the whole recipe as one resumable run with lineage (`jobs/pipeline.py`,
`llada-ray run`, `llada-ray status`)."""
