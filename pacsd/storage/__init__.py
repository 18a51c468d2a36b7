"""Where images live: files on disk written durably (store), the one path that makes a received
instance durable in file and index (archive), and the housekeeping of one node at a time.
"""
