/**
 * QEMU 7.2's user-creatable object types as `--object help` lists them, and
 * the properties `--object TYPE,help` prints for each (name and QAPI type,
 * in QEMU's order). Only `secret` can be created here; the rest exist so
 * the help output is the same.
 */
export const OBJECT_TYPES: Record<string, string[]> = {
  'authz-list': ['policy=<QAuthZListPolicy>', 'rules=<QAuthZListRule>'],
  'authz-list-file': ['filename=<string>', 'refresh=<bool>'],
  'authz-simple': ['identity=<string>'],
  'main-loop': ['aio-max-batch=<int>', 'thread-pool-max=<int>', 'thread-pool-min=<int>'],
  'pr-manager-helper': ['path=<string>'],
  secret: ['data=<string>', 'file=<string>', 'format=<QCryptoSecretFormat>', 'iv=<string>', 'keyid=<string>'],
  'secret_keyring': ['format=<QCryptoSecretFormat>', 'iv=<string>', 'keyid=<string>', 'serial=<int32_t>'],
  'thread-context': ['cpu-affinity=<int>', 'node-affinity=<int>'],
  'throttle-group': ['limits=<ThrottleLimits>', 'x-bps-read-max-length=<int>', 'x-bps-read-max=<int>', 'x-bps-read=<int>', 'x-bps-total-max-length=<int>', 'x-bps-total-max=<int>', 'x-bps-total=<int>', 'x-bps-write-max-length=<int>', 'x-bps-write-max=<int>', 'x-bps-write=<int>', 'x-iops-read-max-length=<int>', 'x-iops-read-max=<int>', 'x-iops-read=<int>', 'x-iops-size=<int>', 'x-iops-total-max-length=<int>', 'x-iops-total-max=<int>', 'x-iops-total=<int>', 'x-iops-write-max-length=<int>', 'x-iops-write-max=<int>', 'x-iops-write=<int>'],
  'tls-cipher-suites': ['dir=<string>', 'endpoint=<QCryptoTLSCredsEndpoint>', 'priority=<string>', 'verify-peer=<bool>'],
  'tls-creds-anon': ['dir=<string>', 'endpoint=<QCryptoTLSCredsEndpoint>', 'priority=<string>', 'verify-peer=<bool>'],
  'tls-creds-psk': ['dir=<string>', 'endpoint=<QCryptoTLSCredsEndpoint>', 'priority=<string>', 'username=<string>', 'verify-peer=<bool>'],
  'tls-creds-x509': ['dir=<string>', 'endpoint=<QCryptoTLSCredsEndpoint>', 'passwordid=<string>', 'priority=<string>', 'sanity-check=<bool>', 'verify-peer=<bool>'],
};

/** What `--object help` (or `?`) prints. */
export function objectListHelp(): string {
  return `List of user creatable objects:\n${Object.keys(OBJECT_TYPES).map((t) => `  ${t}\n`).join('')}`;
}

/** What `--object TYPE,help` prints; the type list for a type QEMU does not know. */
export function objectTypeHelp(type: string): string {
  const props = OBJECT_TYPES[type];
  if (!props) return objectListHelp();
  return `${type} options:\n${props.map((p) => `  ${p}\n`).join('')}`;
}

/**
 * The help an --object definition asks for (QEMU's user_creatable_help_func):
 * `help` or `?` as the type lists the types, as a later bare item prints the
 * type's properties. Null when the definition is not a help request.
 */
export function objectHelp(arg: string): string | null {
  const items = arg.split(',');
  const isHelp = (x: string): boolean => x === 'help' || x === '?';
  if (isHelp(items[0]!)) return objectListHelp();
  if (items.slice(1).some(isHelp)) return items[0]!.includes('=') ? objectListHelp() : objectTypeHelp(items[0]!);
  return null;
}
