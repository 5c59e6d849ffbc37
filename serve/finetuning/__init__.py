"""The OpenAI-compatible fine-tuning API (files, jobs, events, checkpoints) on the serving app.

config.py    typed settings (ServeSettings.finetuning) and the request models of a job
db.py        SQLAlchemy tables: files, jobs, events, checkpoints; idempotent event writes
files.py     file bytes in storage (local directory or s3://, through core.storage)
params.py    a job request -> a JobConfig (hyperparameters, "auto", the rayft extension key)
models.py    OpenAI model ids (ft:BASE:TENANT:SUFFIX:ID) <-> registry names, in one place
launcher.py  each job as a Ray job (Ray Jobs API): submit, stop, status
runner.py    the Ray job's entrypoint: validate, train (jobs.finetune.run_job), gate, promote
reconcile.py the API's view of jobs brought in line with their Ray jobs after a restart
service.py   what the routes do, per tenant
api.py       the FastAPI routes (mounted on serve/app.py's app)
"""
