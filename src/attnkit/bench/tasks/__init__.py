"""Learned benchmark tasks (S1 MQAR, S3 induction heads, S4 passkey, L1 ListOps), one module each,
sharing the interface and training loop of ``base``."""

from .induction import Induction
from .listops import ListOps
from .mqar import MQAR
from .passkey import Passkey

TASKS = {t.name: t for t in (MQAR(), Induction(), Passkey(), ListOps())}
TASK_OF_TIER = {t.tier: t for t in TASKS.values()}
