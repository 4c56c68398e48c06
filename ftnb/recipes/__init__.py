"""Recipe specifics: what one notebook knows about its own data (label definitions, house
formats). Everything here is also readable from the data folder, so your own data needs none of it.
"""
