"""Model code: pipelines that know nothing of tasks, jobs or the worker around them."""
