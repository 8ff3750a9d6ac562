"""Federated tasks: `ClientData` builders, partitions, and the packed support/query format."""

from mfl_tff.data.client_data import ArrayClientData
from mfl_tff.data.packing import PackSpec, SplitSpec
from mfl_tff.data.registry import get_task, register_task, task_from_keras, task_names
from mfl_tff.data.settings import TaskSettings
from mfl_tff.data.task import FederatedTask

__all__ = [
    "ArrayClientData",
    "FederatedTask",
    "PackSpec",
    "SplitSpec",
    "TaskSettings",
    "get_task",
    "register_task",
    "task_from_keras",
    "task_names",
]
