/** Types of scripts/cli-bundle.mjs (plain JavaScript so it runs before any build). */
/** Path of the command-line bundle (build/cli/cli.mjs). */
export declare const CLI_BUNDLE: string;
/** True when the bundle is missing, was built with other settings, or any of its sources changed since. */
export declare function cliBundleStale(): boolean;
/** Builds the bundle; resolves false when esbuild is missing or fails. */
export declare function buildCliBundle(verbose?: boolean): Promise<boolean>;
