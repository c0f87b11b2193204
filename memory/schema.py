"""Every table of the database as the code queries it: one `MetaData`, owned here.

The migrations (`memory.migrations`) are the source of truth for the schema; these definitions
restate what the latest migration leaves, and tests/test_migrations.py checks them column for
column, foreign key for foreign key. Migrations keep their own per-version tables and never import
these, so that replaying an old migration keeps producing the old schema.

Modules query these tables through their own named functions: the conversation store
(`memory.store`), long-term memory (`memory.longterm`), synthetic pairs (`training.synth`), the
retraining jobs (`training.jobs`), the adapter registry (`training.registry`) and the loop settings
(`training.scheduler`).
"""

from __future__ import annotations

import sqlalchemy as sa

from memory.db import UTCDateTime

MAX_USERNAME = 64
MAX_TITLE = 200
MAX_SOURCE = 32
MAX_KEY_NAME = 100
MAX_ADAPTER = 200

metadata = sa.MetaData()

# ------------------------------------------------------------------ the conversation store (memory.store)
users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(MAX_USERNAME), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # added by migration 6: set while an admin has disabled the account
    sa.Column("disabled_at", UTCDateTime, nullable=True),
)
api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(MAX_KEY_NAME), nullable=False),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
)
conversations = sa.Table(
    "conversations", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("title", sa.String(MAX_TITLE), nullable=False),
    sa.Column("source", sa.String(MAX_SOURCE), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
messages = sa.Table(
    "messages", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("conversation_id", sa.Integer, sa.ForeignKey("conversations.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("adapter", sa.String(MAX_ADAPTER), nullable=True),
    sa.Column("generation", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # added by migration 2
    sa.Column("sources", sa.JSON, nullable=False),
    sa.Column("memories", sa.JSON, nullable=False),
    sa.Column("steps", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="SET NULL"), nullable=True),
    # added by migration 7: written by the client (history sent with a request), not by this server
    sa.Column("imported", sa.Boolean, nullable=False, server_default=sa.false()),
)
feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("rating", sa.Integer, nullable=True),
    sa.Column("reason", sa.String(32), nullable=True),
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("corrected", sa.Text, nullable=True),
    sa.Column("other_message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="CASCADE"),
              nullable=True),
    sa.Column("chosen_message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="CASCADE"),
              nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
)
admin_audit = sa.Table(
    "admin_audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("target_user_id", sa.Integer, nullable=True),
    sa.Column("target", sa.String(200), nullable=True),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

# ------------------------------------------------------------------ long-term memory (memory.longterm)
memories = sa.Table(
    "memories", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("slot", sa.String(120), nullable=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("superseded_by", sa.Integer, sa.ForeignKey("memories.id", ondelete="SET NULL"), nullable=True),
    sa.Column("embedding", sa.LargeBinary, nullable=True),
    sa.Column("embedder", sa.String(200), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
memory_tombstones = sa.Table(
    "memory_tombstones", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("forgotten_at", UTCDateTime, nullable=False),
)

# ------------------------------------------------------------------ synthetic pairs (training.synth)
synthetic_pairs = sa.Table(
    "synthetic_pairs", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("teacher", sa.String(200), nullable=False),
    sa.Column("doc_id", sa.String(200), nullable=True),
    sa.Column("chunk_id", sa.String(200), nullable=True),
    sa.Column("chunk_sha256", sa.String(64), nullable=True),
    sa.Column("question", sa.Text, nullable=False),
    sa.Column("question_source", sa.String(16), nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("rejected", sa.Text, nullable=True),
    sa.Column("accepted", sa.Boolean, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("rejected_score", sa.Float, nullable=True),
    sa.Column("judge", sa.JSON, nullable=False),
    # a repair pair dies with the answer it repairs (and so with its conversation)
    sa.Column("target_message_id", sa.Integer, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

# ------------------------------------------------------------------ retraining jobs (training.jobs)
training_jobs = sa.Table(
    "training_jobs", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("trigger", sa.String(32), nullable=False),
    sa.Column("requested_by", sa.String(64), nullable=True),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("progress", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("heartbeat_at", UTCDateTime, nullable=True),
)
job_events = sa.Table(
    "job_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

# ------------------------------------------------------------------ the adapter registry (training.registry)
adapter_versions = sa.Table(
    "adapter_versions", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("parent", sa.String(64), nullable=True),
    sa.Column("files", sa.JSON, nullable=False),
    sa.Column("gate", sa.String(16), nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("training_jobs.id", ondelete="SET NULL"), nullable=True),
    sa.Column("dataset", sa.String(200), nullable=True),
    sa.Column("note", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("deleted_at", UTCDateTime, nullable=True),
    # added by migration 8: the user a personal adapter belongs to (NULL = the shared adapter)
    sa.Column("owner_id", sa.Integer, nullable=True),
)
adapter_serving = sa.Table(
    "adapter_serving", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("version", sa.String(64), nullable=True),
    sa.Column("previous", sa.String(64), nullable=True),
    sa.Column("actor", sa.String(64), nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # added by migration 8: whose personal adapter the event switched (NULL = the shared adapter)
    sa.Column("owner_id", sa.Integer, nullable=True),
)

# ------------------------------------------------------------------ personal adapters (training.personal)
personal_settings = sa.Table(
    "personal_settings", metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True,
              autoincrement=False),
    sa.Column("opted_in", sa.Boolean, nullable=False),
    # "Forget what you learned from me": the user's feedback up to this id stays out of every later build.
    sa.Column("forgotten_through", sa.Integer, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# ------------------------------------------------------------------ loop settings (training.scheduler)
loop_settings = sa.Table(
    "loop_settings", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.JSON, nullable=False),
    sa.Column("updated_by", sa.String(64), nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
