"""A small Celery project using celery_lock; ``bash example_project/run`` runs its demo."""
