"""The HTML report's jinja2 template (kept in a module so it ships with the package)."""

TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>attnkit benchmark — {{ run.run_id }}</title>
<style>
 body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1320px;
        color: #1d1d1f; padding: 0 16px; }
 h1 { font-size: 24px; margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 2px solid #ddd; padding-bottom: 4px; }
 h3 { font-size: 15px; margin: 20px 0 6px; }
 .meta { color: #555; font-size: 13px; } .meta b { color: #1d1d1f; }
 table { border-collapse: collapse; margin: 6px 0 14px; font-size: 12.5px; }
 th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
 th { background: #f4f4f6; position: sticky; top: 0; }
 td:first-child, th:first-child { text-align: left; }
 td.na { color: #888; background: #fafafa; } td.fail { color: #fff; background: #c62828; }
 td.good { background: #e3f4e1; } td.bad { background: #fde8e6; }
 td[title] { cursor: help; } td.left { text-align: left; white-space: normal; max-width: 720px; }
 .note { color: #555; font-size: 12.5px; max-width: 1100px; }
 .counts span { display: inline-block; margin-right: 14px; }
 img { max-width: 100%; border: 1px solid #eee; margin: 8px 0; }
 .verdict { background: #fff7e0; border-left: 4px solid #f0b400; padding: 6px 10px; margin: 4px 0; font-size: 13px; }
 nav a { margin-right: 12px; }
 .scroll { overflow-x: auto; }
</style></head><body>
<h1>attnkit benchmark</h1>
<div class="meta">
 run <b>{{ run.run_id }}</b> · preset <b>{{ run.preset }}</b> · device <b>{{ device_name }}</b>
 · CPU {{ machine.cpu }} ({{ machine.cpu_count }} cores, {{ machine.threads }} threads{% if machine.load_avg %},
 load average {{ machine.load_avg }} at the start{% endif %})
 · torch {{ machine.torch }} · python {{ machine.python }} · host {{ machine.host }} · started {{ started }}
</div>
<p class="counts">{% for status, n in counts %}<span><b>{{ n }}</b> {{ status }}</span>{% endfor %}
 <span>over {{ methods|length }} methods: {{ methods|join(", ") }}</span></p>
<p class="note">Every number comes from this run on this machine, against baselines measured in the same run; numbers from
different cards or runs are never mixed. <b>n/a</b> means the method cannot run that pattern or size (hover for the reason;
all reasons are listed at the end); <b>FAIL</b> an error while running, <b>OOM</b> out of memory. Cells with a dotted
cursor carry details on hover.</p>
<nav>{% for s in sections %}<a href="#{{ s.id }}">{{ s.title.split(':')[0] }}</a>{% endfor %}</nav>
{% for s in sections %}
<h2 id="{{ s.id }}">{{ s.title }}</h2>
{% if s.text %}<p class="note">{{ s.text }}</p>{% endif %}
{% for v in s.verdicts %}<div class="verdict">{{ v }}</div>{% endfor %}
{% for img in s.images %}<img src="{{ img }}" alt="{{ img }}">{% endfor %}
{% for t in s.tables %}
<h3>{{ t.title }}</h3>{% if t.caption %}<p class="note">{{ t.caption }}</p>{% endif %}
<div class="scroll"><table><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for c in row %}<td class="{{ c.cls }}{% if loop.last and s.id == 'na' %} left{% endif %}"{% if c.note %} title="{{ c.note }}"{% endif %}>{{ c.text }}</td>{% endfor %}</tr>
{% endfor %}</table></div>
{% endfor %}
{% if not s.tables and not s.images %}<p class="note">Nothing measured for this tier in this run.</p>{% endif %}
{% endfor %}
</body></html>
"""
