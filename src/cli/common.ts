/**
 * Options both commands share: --object (QEMU's user-creatable objects) and
 * -T/--trace. Each returns an error message to report, or null.
 */

/**
 * Validates one --object definition. qblock knows one object type, `secret`
 * (accepted for command-line compatibility; no driver here consumes secrets
 * yet), checked as QEMU checks it; other types are refused the way QEMU
 * refuses unknown ones. `ids` collects the ids defined so far.
 */
export function checkObjectOption(arg: string, ids: Set<string>): string | null {
  const props: Record<string, string> = {};
  arg.split(',').forEach((item, i) => {
    const eq = item.indexOf('=');
    // An empty first item names no type (QEMU: the parameter is missing).
    if (eq < 0 && i === 0) { if (item !== '') props['qom-type'] = item; }
    else if (eq >= 0) props[item.slice(0, eq)] = item.slice(eq + 1);
  });
  const type = props['qom-type'];
  if (type === undefined) return "Parameter 'qom-type' is missing";
  if (type !== 'secret') return `Parameter 'qom-type' does not accept value '${type}'`;
  const id = props.id;
  if (id === undefined) return "Parameter 'id' is missing";
  if (ids.has(id)) return `attempt to add duplicate property '${id}' to object (type 'container')`;
  if (props.data === undefined && props.file === undefined) return "Either 'file' or 'data' must be provided";
  ids.add(id);
  return null;
}

/**
 * -T/--trace (QEMU's trace_opt_parse): `[enable=]pattern,events=file,file=file`.
 * qblock has no trace events, so every event named without a wildcard "does
 * not exist". Returns the warnings and, for a malformed list, the error that
 * ends the program.
 */
export function parseTraceOption(arg: string): { warnings: string[]; error: string | null } {
  const warnings: string[] = [];
  let enable: string | undefined;
  const items = arg.split(',');
  for (let i = 0; i < items.length; i++) {
    const item = items[i]!;
    const eq = item.indexOf('=');
    if (eq < 0 && i === 0) {
      enable = item;
      continue;
    }
    if (eq < 0) {
      warnings.push(`warning: short-form boolean option '${item}' deprecated\nPlease use ${item}=on instead`);
      return { warnings, error: `Invalid parameter '${item}'` };
    }
    const key = item.slice(0, eq);
    if (key !== 'enable' && key !== 'events' && key !== 'file') return { warnings, error: `Invalid parameter '${key}'` };
    if (key === 'enable') enable = item.slice(eq + 1);
  }
  if (enable && !/[*?]/.test(enable)) warnings.push(`warning: trace event '${enable}' does not exist`);
  return { warnings, error: null };
}
