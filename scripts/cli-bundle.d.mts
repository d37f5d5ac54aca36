/** Types of scripts/cli-bundle.mjs (plain JavaScript so it runs before any build). */
/** Path of the command-line bundle (build/cli/cli.cjs). */
export declare const CLI_BUNDLE: string;
/** Path of V8's code cache for the bundle (build/cli/cli.cache). */
export declare const CLI_CODE_CACHE: string;
/** True when the bundle is missing, was built with other settings, or any of its sources changed since. */
export declare function cliBundleStale(): boolean;
/** Builds the bundle; resolves false when esbuild is missing or fails. */
export declare function buildCliBundle(verbose?: boolean): Promise<boolean>;
