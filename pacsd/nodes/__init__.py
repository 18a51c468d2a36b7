"""Talking to other DICOM nodes: associations we request (remote), auto-routing (routing).
Who the nodes are is pacsd.accounts; the index family keeps the routing outbox.
"""
