import pytest


@pytest.fixture
def task_identity(monkeypatch):
    """What Flower's runtime sets in a ServerApp process before messages are created."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
