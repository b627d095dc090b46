"""Dataset readers: files in, checked arrays out (D4RL/npz/hdf5, Minari, SB3 buffers, LeRobot).

Every reader opens its files as regular files and bounds what their headers declare before it
allocates; :class:`dql_agent.buffer.OfflineBuffer` builds the dataset from what they return.
"""
