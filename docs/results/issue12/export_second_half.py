"""ML-100K's second half by time as a separate MovieLens-100K-format folder (held-out stream)."""
import numpy as np
from core.datasets import load_dataset, ML100K_GENRES
from trainer.prequential import stream_order
ds = load_dataset('ml-100k'); df = stream_order(ds.ratings); h2 = df.iloc[len(df)//2:]
with open('/tmp/ml100k-h2/u.data', 'w') as f:
    for u, m, r, t in zip(h2.user_id, h2.movie_id, h2.rating, h2.ts):
        f.write(f"{u}\t{m}\t{int(r)}\t{t}\n")
with open('/tmp/ml100k-h2/u.item', 'w', encoding='latin-1') as f:
    for mid, title, year, genres in zip(ds.movies.movie_id, ds.movies.title, ds.movies.year, ds.movies.genres):
        t = f"{title} ({int(year)})" if year == year else title
        flags = "|".join("1" if g in genres else "0" for g in ML100K_GENRES)
        f.write(f"{mid}|{t.replace('|', ' ')}|||x|{flags}\n".encode('latin-1', 'replace').decode('latin-1'))
with open('/tmp/ml100k-h2/u.user', 'w') as f:
    for u, a, g, o in zip(ds.users.user_id, ds.users.age, ds.users.gender, ds.users.occupation):
        f.write(f"{u}|{int(a)}|{g}|{o}|00000\n")
d2 = load_dataset('/tmp/ml100k-h2')
print(len(d2.ratings), len(d2.movies), len(d2.users), d2.movies.head(2).to_dict('records'))
