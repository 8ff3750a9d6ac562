"""Regenerates BUILD from the tree: `python .ci/genbuild.py > BUILD` (tests/build_test.py checks it)."""
import ast, os, glob
import sys
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
EXCLUDE=set(sys.argv[1:])
mods=sorted(glob.glob('mfl_tff/**/*.py', recursive=True))
exps=sorted(glob.glob('experiments/*.py'))
tests=sorted(glob.glob('tests/*.py'))
def target(path):
    if path.endswith('__init__.py'):
        return path[:-len('/__init__.py')].replace('/','_')+'_init' if False else None
    return os.path.splitext(os.path.basename(path))[0]
def label(path):
    d=os.path.dirname(path); n=os.path.splitext(os.path.basename(path))[0]
    return f'//{d}:{n}'
def deps(path):
    tree=ast.parse(open(path).read())
    out=set(); ext=set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split('.')[0] in ('mfl_tff', 'tests', 'experiments'):
                for a in node.names:
                    cand=node.module.replace('.','/')+'/'+a.name+'.py'
                    if os.path.exists(cand): out.add(cand)
                    elif os.path.exists(node.module.replace('.','/')+'.py'): out.add(node.module.replace('.','/')+'.py')
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith('mfl_tff'):
                    c=a.name.replace('.','/')+'.py'
                    if os.path.exists(c): out.add(c)
    out.discard(path)
    return sorted(out)
lines=['# Bazel targets for every module, binary and test. Bazel cannot build here (TFF_NOTES.md:',
 '# rules need the network), so tests/build_test.py keeps this file true to the tree.','',
 'load("@rules_python//python:defs.bzl", "py_binary", "py_library", "py_test")','',
 'package(default_visibility = ["//visibility:public"])','']
byname={}
mods=[m for m in mods if m not in EXCLUDE]; exps=[m for m in exps if m not in EXCLUDE]; tests=[m for m in tests if m not in EXCLUDE]
for p in mods+exps+tests:
    d=os.path.dirname(p); n=os.path.splitext(os.path.basename(p))[0]
    byname[p]=':'+p[:-3].replace('/','_').replace('___init__','')
def fmt_deps(p):
    ds=[byname[x] for x in deps(p) if x in byname]
    return ds
blocks={}
for p in mods+exps+tests:
    d=os.path.dirname(p); n=os.path.splitext(os.path.basename(p))[0]
    kind='py_test' if p.endswith('_test.py') else ('py_binary' if p.startswith('experiments/') and 'app.run(' in open(p).read() else 'py_library')
    # every module also depends on its package's __init__

    b=[f'{kind}(', f'    name = "{byname[p][1:]}",', f'    srcs = ["{p}"],']
    if kind=='py_binary': b.append(f'    main = "{p}",')
    ds=fmt_deps(p)
    if ds:
        b.append('    deps = [')
        b+= [f'        "{x}",' for x in ds]
        b.append('    ],')
    if kind=='py_test': b.append('    size = "medium",')
    b.append(')')
    blocks.setdefault(d,[]).append('\n'.join(b))
for d in sorted(blocks):
    lines.append(f'# ---- {d}/ ----')
    lines.append('\n\n'.join(blocks[d])); lines.append('')
print('\n'.join(lines))
