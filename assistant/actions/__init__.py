"""The action layer: every action a person or an operator can take, once, for every way in.

The HTTP API (assistant/library_api.py, assistant/users_api.py), the command line (assistant/cli.py)
and the page (ui/) call these classes; none of them repeats an action's rules. Each action takes the
acting `User` (or, for the operator at the server's own command line, an `Operator`) first and
checks who may do it before anything is read or changed; ownership and privacy rules live here
(deleting a document also deletes the teacher pairs made from it, deleting a user deletes
everything of theirs).

    base.py           errors and the who-may-do-what checks
    library.py        documents and long-term memories of one user (`Library`)
    users.py          accounts, API keys and the audit log, for admins (`UserAdmin`)
    conversations.py  a user's conversations exported as JSON or Markdown, with feedback
    account.py        a user's own password
    readiness.py      what a retrain would use now and what is missing, for admins

Place in the one-way rule: these sit with the ways in, above `training` (a deleted document's
teacher pairs and a deleted user's dataset rows are training data), and import nothing from the
HTTP, CLI or page modules.
"""
