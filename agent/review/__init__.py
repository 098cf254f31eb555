"""The review page (`speedsearch review`): a local web app over a search's runs database.

server.py serves it (token, loopback, the JSON API), views.py turns the runs database into what the
page shows, diffview.py renders side-by-side highlighted diffs, desk.py is the running search's side
(it applies queued reviews and replays approved candidates), static/ is the page itself.
"""
